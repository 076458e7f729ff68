"""Grafana dashboards for the shadow, built with grafana-foundation-sdk; `python -m deploy.generate` writes
them to deploy/grafana/dashboards/."""
