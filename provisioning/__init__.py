"""Technician tooling: node registry, credentials and broker ACLs, flash, install, verify."""
