"""Running the shadow in production: Grafana dashboards and Prometheus rules (generated from code: run
`python -m deploy.generate`), a Prometheus scrape config, and Ray and Kubernetes examples."""
