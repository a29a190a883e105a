"""Build output: deterministic, one JSON per pair, valid against Grafana's schemas, lint-clean."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dashboards.cli import app
from dashboards.config import load_cities
from dashboards.lint import (
    check_datasources,
    check_ids,
    check_overlaps,
    check_placeholders,
    check_queries,
    check_units,
    check_variables,
    lint_dashboard,
    panels,
)
from dashboards.spec import render_dashboards
from tests.dashboards.stack import NODES, write_registry

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "shared" / "grafana-jsonschema"
runner = CliRunner()


def all_models() -> list[dict[str, Any]]:
    from provisioning.registry import Node

    nodes = [Node(id=n.id, city=n.city, domain=n.domain, site=n.site, lat=n.lat, lon=n.lon) for n in NODES]  # type: ignore[arg-type]
    return [r.model for r in render_dashboards(["marine", "mobility"], nodes, ("copenhagen", "tongyeong"))]


def test_build_is_deterministic_and_one_json_serves_both_cities(tmp_path: Path) -> None:
    reg = write_registry(tmp_path / "registry")
    for out in ("a", "b"):
        res = runner.invoke(app, ["build", "--out", str(tmp_path / out), "--registry", str(reg)])
        assert res.exit_code == 0, res.output
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 4 * 5
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    cities = load_cities()
    for name, city in cities.cities.items():
        partner = city.partner
        for dash in (tmp_path / "a" / name / "dashboards").glob("*.json"):
            assert dash.read_bytes() == (tmp_path / "a" / partner / "dashboards" / dash.name).read_bytes(), (name, dash.name)
    marine = json.loads((tmp_path / "a" / "copenhagen" / "dashboards" / "marine.json").read_text())
    assert marine["uid"] == "twinedge-marine" and marine["id"] is None
    assert "${DS_" not in (tmp_path / "a" / "copenhagen" / "dashboards" / "marine.json").read_text()


def test_provisioning_yaml_has_fixed_uids_and_partner_url(tmp_path: Path) -> None:
    res = runner.invoke(app, ["build", "--out", str(tmp_path), "--city", "copenhagen", "--registry", str(write_registry(tmp_path / "r"))])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "r") == ["copenhagen"]
    ds = yaml.safe_load((tmp_path / "copenhagen/provisioning/datasources/twinedge.yaml").read_text())
    cities = load_cities()
    by_uid = {d["uid"]: d for d in ds["datasources"]}
    assert set(by_uid) == {"influx-home", "influx-partner"}
    assert by_uid["influx-home"]["url"] == cities.get("copenhagen").influx_url
    assert by_uid["influx-partner"]["url"] == cities.get("tongyeong").influx_url
    assert by_uid["influx-home"]["isDefault"] is True and by_uid["influx-partner"]["isDefault"] is False
    prov = yaml.safe_load((tmp_path / "copenhagen/provisioning/dashboards/twinedge.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["folderUid"] == "twinedge"


def _validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extras: pip install -e '.[test]'")
    path = SCHEMA_DIR / f"{name}.jsonschema.json"
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"{SCHEMA_DIR} is absent (it ships beside the project, not with it): schema validation skipped")
    return jsonschema, json.loads(path.read_text())


def test_dashboards_validate_against_grafana_schemas() -> None:
    jsonschema, dash_schema = _validator("dashboard")
    panel_schemas = {k: _validator(k)[1] for k in ("timeseries", "stat", "geomap")}
    checked = 0
    for model in all_models():
        v = jsonschema.Draft7Validator(dash_schema)
        err = jsonschema.exceptions.best_match(v.iter_errors(model))
        assert err is None, f"{model['uid']}: {err.json_path}: {err.message}"
        for p in panels(model):
            schema = panel_schemas.get(p["type"])
            if schema is None:
                continue
            opts = {"$ref": "#/definitions/Options", "definitions": schema["definitions"]}
            err = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(opts).iter_errors(p.get("options", {})))
            assert err is None, f"{model['uid']} panel {p['id']} options: {err.json_path}: {err.message}"
            custom = (p.get("fieldConfig") or {}).get("defaults", {}).get("custom")
            if custom is not None and "FieldConfig" in schema["definitions"]:
                fc = {"$ref": "#/definitions/FieldConfig", "definitions": schema["definitions"]}
                err = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(fc).iter_errors(custom))
                assert err is None, f"{model['uid']} panel {p['id']} fieldConfig.custom: {err.json_path}: {err.message}"
            checked += 1
    assert checked >= 30


def test_schema_validation_can_fail() -> None:
    jsonschema, dash_schema = _validator("dashboard")
    model = copy.deepcopy(all_models()[0])
    model["panels"][1]["gridPos"]["w"] = 30
    assert list(jsonschema.Draft7Validator(dash_schema).iter_errors(model))


def test_generated_dashboards_are_lint_clean() -> None:
    models = all_models()
    assert [m["uid"] for m in models] == ["twinedge-marine", "twinedge-mobility", "twinedge-fleet", "twinedge-twin"]
    for model in models:
        assert lint_dashboard(model) == []


def _first_panel(model: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in panels(model) if p["type"] == kind)


def test_lints_catch_planted_problems() -> None:
    base = all_models()[0]

    def planted(mutate: Any) -> dict[str, Any]:
        m = copy.deepcopy(base)
        mutate(m)
        return m

    ts = lambda m: _first_panel(m, "timeseries")  # noqa: E731
    assert check_units(planted(lambda m: ts(m)["fieldConfig"]["defaults"].update(unit="conc:mgL")))
    assert check_units(planted(lambda m: ts(m)["fieldConfig"]["defaults"].pop("unit")))
    assert check_datasources(planted(lambda m: ts(m).update(datasource={"type": "influxdb", "uid": "${DS_INFLUX}"})))
    assert check_datasources(planted(lambda m: ts(m)["targets"][0].update(datasource={"type": "influxdb", "uid": "influx-partner"})))
    assert check_placeholders(planted(lambda m: m.update(__inputs=[])))
    assert check_overlaps(planted(lambda m: ts(m)["gridPos"].update(x=0, y=0)))
    assert check_variables(planted(lambda m: ts(m).update(title="pH in $town")))
    assert check_ids(planted(lambda m: ts(m).update(id=1)))
    assert check_ids(planted(lambda m: m.update(id=7)))
    assert check_queries(planted(lambda m: ts(m)["targets"][0].update(query=ts(m)["targets"][0]["query"].replace(' AS "ph"', ""))))
    assert check_queries(planted(lambda m: ts(m)["targets"][0].update(query=ts(m)["targets"][0]["query"] + " SLIMIT 5")))
    assert check_queries(planted(lambda m: ts(m)["targets"][0].update(query=ts(m)["targets"][0]["query"].replace(" AND $timeFilter", ""))))


def test_units_come_from_the_gateway_schema() -> None:
    marine = all_models()[0]
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels(marine) if p["type"] == "timeseries"}
    assert units["Dissolved oxygen"] == "suffix:mg/L"
    assert units["Conductivity"] == "suffix:µS/cm"
    assert units["Salinity"] == "suffix:PSU"
    assert units["Turbidity"] == "suffix:NTU"
    assert units["Water temperature"] == "celsius"


def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "cities.toml"
    bad.write_text('[cities.a]\ntitle = "A"\npartner = "b"\ndomains = ["marine"]\ninflux_url = "http://x"\n')
    res = runner.invoke(app, ["build", "--out", str(tmp_path / "o"), "--cities", str(bad)])
    assert res.exit_code == 2 and "partner 'b'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["build", "--out", str(tmp_path / "o"), "--city", "atlantis", "--registry", str(write_registry(tmp_path / "r"))])
    assert res.exit_code == 2 and "unknown city 'atlantis'" in res.output
    res = runner.invoke(app, ["build", "--out", str(tmp_path / "o"), "--registry", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no nodes/ folder" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
