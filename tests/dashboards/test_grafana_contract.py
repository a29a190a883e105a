"""Contract tests of `push` and `diff` against a local HTTP server that answers like Grafana's API.

No Grafana server can run on these machines; grafana-client (niquests) talks real HTTP to
tests/dashboards/fake_grafana.py, which records every request.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dashboards.cli import app
from dashboards.config import load_cities
from tests.dashboards.fake_grafana import FakeGrafana
from tests.dashboards.stack import write_registry

runner = CliRunner()
TOKEN = "glsa_test_token"
UIDS = {"twinedge-marine", "twinedge-fleet", "twinedge-twin"}


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with FakeGrafana(TOKEN) as g:
        yield g


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "registry")


def cli(args: list[str], url: str, registry: Path, token: str | None = TOKEN, **env: str) -> tuple[int, str]:
    full_env = {"TWINEDGE_GRAFANA_URL": url, "TWINEDGE_GRAFANA_TOKEN": token or "", **env}
    res = runner.invoke(app, [*args, "--registry", str(registry)], env=full_env)
    return res.exit_code, res.output


def test_push_creates_folder_datasources_and_dashboards(grafana: FakeGrafana, registry: Path) -> None:
    code, out = cli(["push", "--city", "copenhagen", "-m", "release 1.2"], grafana.url, registry,
                    TWINEDGE_INFLUX_PASSWORD="s3cret", TWINEDGE_PARTNER_INFLUX_PASSWORD="other")
    assert code == 0, out
    st = grafana.state
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in st.requests)
    assert st.folders["twinedge"]["title"] == "TwinEdge"
    cities = load_cities()
    assert st.datasources["influx-home"]["url"] == cities.get("copenhagen").influx_url
    assert st.datasources["influx-partner"]["url"] == cities.get("tongyeong").influx_url
    assert st.datasources["influx-home"]["type"] == "influxdb"
    assert st.datasources["influx-home"]["jsonData"]["dbName"] == "twinedge"
    creates = [r.body for r in st.requests if r.method == "POST" and r.path == "/api/datasources"]
    assert {c["uid"]: c["secureJsonData"]["password"] for c in creates} == {"influx-home": "s3cret", "influx-partner": "other"}
    saves = [r.body for r in st.requests if r.path == "/api/dashboards/db"]
    assert {s["dashboard"]["uid"] for s in saves} == UIDS
    for s in saves:
        assert s["message"] == "release 1.2" and s["overwrite"] is True and s["folderUid"] == "twinedge"
        assert s["dashboard"]["id"] is None
        assert "${DS_" not in json.dumps(s["dashboard"])
    # The folder exists before any dashboard is saved into it.
    order = [r.path for r in st.writes()]
    assert order.index("/api/folders") < order.index("/api/dashboards/db")


def test_second_push_writes_nothing_and_diff_is_clean(grafana: FakeGrafana, registry: Path) -> None:
    assert cli(["push", "--city", "copenhagen"], grafana.url, registry)[0] == 0
    n_writes = len(grafana.state.writes())
    code, out = cli(["push", "--city", "copenhagen"], grafana.url, registry)
    assert code == 0, out
    assert len(grafana.state.writes()) == n_writes, [r.path for r in grafana.state.writes()[n_writes:]]
    assert out.count("unchanged") == 2 + len(UIDS)
    # The server added id and version (server-owned): not drift.
    assert all(d["dashboard"]["id"] and d["dashboard"]["version"] == 1 for d in grafana.state.dashboards.values())
    code, out = cli(["diff", "--city", "copenhagen"], grafana.url, registry)
    assert code == 0, out
    assert "in sync" in out and "drift" not in out


def test_diff_reports_drift_and_push_repairs_it(grafana: FakeGrafana, registry: Path) -> None:
    assert cli(["push", "--city", "copenhagen"], grafana.url, registry)[0] == 0
    st = grafana.state
    fleet = st.dashboards["twinedge-fleet"]["dashboard"]
    next(p for p in fleet["panels"] if p["id"] == 4)["title"] = "edited in the UI"
    fleet["version"] = 7
    fleet["iteration"] = 123
    del st.dashboards["twinedge-twin"]
    st.datasources["influx-partner"]["url"] = "http://wrong:8086"
    code, out = cli(["diff", "--city", "copenhagen"], grafana.url, registry)
    assert code == 1, out
    assert "dashboard twinedge-fleet: 1 difference(s)" in out
    assert "panels[id=4].title" in out and "edited in the UI" in out
    assert "dashboard twinedge-twin: missing" in out
    assert "datasource influx-partner" in out and "http://wrong:8086" in out
    assert "dashboard twinedge-marine: in sync" in out
    assert "version" not in out.replace("twinedge", "")  # server-owned fields are ignored
    before = len(st.writes())
    code, out = cli(["push", "--city", "copenhagen", "-m", "repair"], grafana.url, registry)
    assert code == 0, out
    saved = {r.body["dashboard"]["uid"] for r in st.writes()[before:] if r.path == "/api/dashboards/db"}
    assert saved == {"twinedge-fleet", "twinedge-twin"}
    assert st.dashboards["twinedge-fleet"]["meta"]["message"] == "repair"
    assert st.dashboards["twinedge-fleet"]["dashboard"]["version"] == 8
    assert cli(["diff", "--city", "copenhagen"], grafana.url, registry)[0] == 0


def test_missing_or_refused_token_and_unreachable_server(grafana: FakeGrafana, registry: Path) -> None:
    code, out = cli(["push", "--city", "copenhagen"], grafana.url, registry, token=None)
    assert code == 2 and "TWINEDGE_GRAFANA_TOKEN" in out and "Traceback" not in out
    code, out = cli(["diff", "--city", "copenhagen"], grafana.url, registry, token="wrong")
    assert code == 3 and "refused the token" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, out = cli(["push", "--city", "copenhagen"], closed, registry)
    assert code == 3 and "cannot reach Grafana" in out and "Traceback" not in out
    code, out = cli(["diff", "--city", "atlantis"], grafana.url, registry)
    assert code == 2 and "unknown city" in out
