"""Push generated dashboards to a city's Grafana and report drift, with grafana-client.

Only the HTTP API is used (folders, datasources by uid, dashboards by uid), so the same
code works against any Grafana >= 9 and is contract-tested against a local HTTP server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from dashboards.build import CREDENTIAL_ENV, CityBuild, datasources_for
from dashboards.config import Cities

TOKEN_ENV = "TWINEDGE_GRAFANA_TOKEN"
URL_ENV = "TWINEDGE_GRAFANA_URL"
# Fields Grafana owns and changes on every save; never drift.
SERVER_OWNED = frozenset({"id", "version", "iteration", "created", "updated", "createdBy", "updatedBy", "meta"})
DATASOURCE_KEYS = ("name", "type", "url", "access", "isDefault", "user", "jsonData")


class GrafanaError(RuntimeError):
    """One line for the technician: what failed and what to do next."""


class GrafanaSetupError(GrafanaError):
    """Missing URL or token: a usage problem on our side, not the server's."""


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    drift: bool = False

    def add(self, line: str) -> None:
        self.lines.append(line)


def connect(url: str, token: str | None, timeout: float = 10.0) -> GrafanaApi:
    if not url:
        raise GrafanaSetupError(f"no Grafana URL: pass --url or set {URL_ENV} (or grafana_url in the cities file)")
    if not token:
        raise GrafanaSetupError(f"no Grafana token: set {TOKEN_ENV} to a service-account token with Editor rights")
    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def _call(what: str, fn: Callable[[], Any], missing_ok: bool = False) -> Any:
    """Run one API call, turning transport/HTTP failures into a one-line GrafanaError.

    With `missing_ok`, a 404 returns None (the object does not exist yet).
    """
    try:
        return fn()
    except GrafanaClientError as e:
        if missing_ok and e.status_code == 404:
            return None
        if e.status_code in (401, 403):
            raise GrafanaError(f"{what}: Grafana refused the token ({e.status_code}); check {TOKEN_ENV}") from None
        raise GrafanaError(f"{what}: Grafana answered {e.status_code}: {_msg(e)}") from None
    except GrafanaException as e:
        raise GrafanaError(f"{what}: {_msg(e)}") from None
    except niquests.exceptions.RequestException as e:
        raise GrafanaError(f"{what}: cannot reach Grafana ({type(e).__name__}); check the URL and network") from None


def _msg(e: GrafanaException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and resp.get("message"):
        return str(resp["message"])
    return str(e).splitlines()[0][:200]


def _get_or_none(what: str, fn: Callable[[], Any]) -> Any:
    return _call(what, fn, missing_ok=True)


def strip_server_fields(dashboard: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dashboard.items() if k not in SERVER_OWNED}


def json_diff(a: object, b: object, path: str = "") -> list[str]:
    """Paths where `a` (code) and `b` (server) differ. Panels are matched by id, not position."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}{k}" if str(k).startswith("[") else f"{path}.{k}" if path else str(k)
            if k not in b:
                out.append(f"{p}: missing on server")
            elif k not in a:
                out.append(f"{p}: only on server")
            else:
                out += json_diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if a and b and all(isinstance(x, dict) and "id" in x for x in a + b):
            return json_diff({f"[id={x['id']}]": x for x in a}, {f"[id={x['id']}]": x for x in b}, path)
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in code, {len(b)} on server"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += json_diff(x, y, f"{path}[{i}]")
        return out
    if a != b or type(a) is not type(b):
        return [f"{path}: code {_short(a)} != server {_short(b)}"]
    return []


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _datasource_payloads(cities: Cities, build: CityBuild) -> list[dict[str, Any]]:
    out = []
    for ds in datasources_for(build.city, cities.partner_of(build.city)):
        user_env, password_env = CREDENTIAL_ENV[str(ds["uid"])]
        user = os.environ.get(user_env, "")
        password = os.environ.get(password_env)
        payload = {k: v for k, v in ds.items() if k not in ("secureJsonData", "editable")}
        payload["user"] = user  # the provisioning file's $VAR is expanded by Grafana, not by the API
        if password:
            payload["secureJsonData"] = {"password": password}
        out.append(payload)
    return out


def diff_city(api: GrafanaApi, cities: Cities, build: CityBuild) -> Report:
    rep = Report()
    city = build.city
    folder = _get_or_none("read folder", lambda: api.folder.get_folder(city.folder_uid))
    if folder is None:
        rep.drift = True
        rep.add(f"folder {city.folder_uid}: missing")
    for want in _datasource_payloads(cities, build):
        have = _get_or_none("read datasource", lambda: api.datasource.get_datasource_by_uid(want["uid"]))
        if have is None:
            rep.drift = True
            rep.add(f"datasource {want['uid']}: missing")
            continue
        diffs = json_diff({k: want.get(k) for k in DATASOURCE_KEYS}, {k: have.get(k) for k in DATASOURCE_KEYS})
        _report(rep, f"datasource {want['uid']}", diffs)
    for r in build.dashboards:
        have = _get_or_none("read dashboard", lambda: api.dashboard.get_dashboard(r.uid))
        if have is None:
            rep.drift = True
            rep.add(f"dashboard {r.uid}: missing")
            continue
        diffs = json_diff(strip_server_fields(r.model), strip_server_fields(have.get("dashboard") or {}))
        folder_uid = (have.get("meta") or {}).get("folderUid")
        if folder_uid is not None and folder_uid != city.folder_uid:
            diffs.append(f"folder: code {city.folder_uid!r} != server {folder_uid!r}")
        _report(rep, f"dashboard {r.uid}", diffs)
    return rep


def _report(rep: Report, what: str, diffs: Iterable[str]) -> None:
    diffs = list(diffs)
    if diffs:
        rep.drift = True
        rep.add(f"{what}: {len(diffs)} difference(s)")
        rep.lines += [f"  {d}" for d in diffs[:20]]
        if len(diffs) > 20:
            rep.add(f"  ... and {len(diffs) - 20} more")
    else:
        rep.add(f"{what}: in sync")


def push_city(api: GrafanaApi, cities: Cities, build: CityBuild, message: str) -> Report:
    rep = Report()
    city = build.city
    if _get_or_none("read folder", lambda: api.folder.get_folder(city.folder_uid)) is None:
        _call("create folder", lambda: api.folder.create_folder(city.folder, uid=city.folder_uid))
        rep.add(f"folder {city.folder_uid}: created")
    else:
        rep.add(f"folder {city.folder_uid}: present")
    for want in _datasource_payloads(cities, build):
        uid = want["uid"]
        have = _get_or_none("read datasource", lambda: api.datasource.get_datasource_by_uid(uid))
        if have is None:
            _call(f"create datasource {uid}", lambda: api.datasource.create_datasource(want))
            rep.add(f"datasource {uid}: created")
        elif json_diff({k: want.get(k) for k in DATASOURCE_KEYS}, {k: have.get(k) for k in DATASOURCE_KEYS}) or "secureJsonData" in want:
            _call(f"update datasource {uid}", lambda: api.datasource.update_datasource_by_uid(uid, want))
            rep.add(f"datasource {uid}: updated")
        else:
            rep.add(f"datasource {uid}: unchanged")
    for r in build.dashboards:
        have = _get_or_none("read dashboard", lambda: api.dashboard.get_dashboard(r.uid))
        if have is not None:
            same = not json_diff(strip_server_fields(r.model), strip_server_fields(have.get("dashboard") or {}))
            if same and (have.get("meta") or {}).get("folderUid", city.folder_uid) == city.folder_uid:
                rep.add(f"dashboard {r.uid}: unchanged")
                continue
        body = {"dashboard": r.model, "folderUid": city.folder_uid, "overwrite": True, "message": message}
        _call(f"save dashboard {r.uid}", lambda: api.dashboard.update_dashboard(body))
        rep.add(f"dashboard {r.uid}: {'created' if have is None else 'updated'}")
    return rep
