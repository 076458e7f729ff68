"""Prometheus: the scrape config, and the shadow's recording and alerting rules (rules.py renders them)."""
