"""Grafana dashboards and provisioning as code, rendered per city, pushed with drift detection."""
