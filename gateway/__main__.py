"""`python -m gateway …` = `twinedge gateway …` without loading the other tools (keeps the service's RSS low)."""

from gateway.cli import app

app(prog_name="twinedge gateway")
