"""A contract fake of the Grafana HTTP API parts `push`/`diff` use (no Grafana can run here).

A real HTTP server on a free loopback port, in a thread, that records every request and answers
like Grafana 10/11 does: bearer-token auth, folders by uid, datasources by uid, dashboards saved
through POST /api/dashboards/db (server assigns id and bumps version) and read back with `meta`.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class State:
    token: str
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {"dashboard", "meta"}
    requests: list[Recorded] = field(default_factory=list)
    next_id: int = 1

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method in ("POST", "PUT", "DELETE")]


class FakeGrafana:
    def __init__(self, token: str = "glsa_test_token") -> None:
        self.state = State(token)
        self.lock = threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeGrafana":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002  keep test output clean
                pass

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                return json.loads(raw) if raw else None

            def _send(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = self._body() if method in ("POST", "PUT") else None
                with fake.lock:
                    st = fake.state
                    st.requests.append(Recorded(method, self.path, body, dict(self.headers.items())))
                    if self.headers.get("Authorization") != f"Bearer {st.token}":
                        return self._send(401, {"message": "Unauthorized"})
                    status, payload = fake.route(method, self.path, body)
                self._send(status, payload)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler

    def route(self, method: str, path: str, body: Any) -> tuple[int, object]:
        st = self.state
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "folders"]:
            if method == "GET" and len(parts) == 3:
                f = st.folders.get(parts[2])
                return (200, f) if f else (404, {"message": "folder not found", "status": "not-found"})
            if method == "POST" and len(parts) == 2:
                if body["uid"] in st.folders:
                    return 409, {"message": "a folder with the same uid already exists"}
                f = {"id": st.next_id, "uid": body["uid"], "title": body["title"], "version": 1}
                st.next_id += 1
                st.folders[body["uid"]] = f
                return 200, f
        if parts[:2] == ["api", "datasources"]:
            if len(parts) == 4 and parts[2] == "uid":
                uid = parts[3]
                if method == "GET":
                    ds = st.datasources.get(uid)
                    return (200, ds) if ds else (404, {"message": "Data source not found"})
                if method == "PUT":
                    if uid not in st.datasources:
                        return 404, {"message": "Data source not found"}
                    st.datasources[uid] = self._stored_datasource(body, st.datasources[uid]["id"])
                    return 200, {"message": "Datasource updated", "id": st.datasources[uid]["id"]}
            if len(parts) == 2 and method == "POST":
                if body.get("uid") in st.datasources:
                    return 409, {"message": "data source with the same uid already exists"}
                ds = self._stored_datasource(body, st.next_id)
                st.next_id += 1
                st.datasources[ds["uid"]] = ds
                return 200, {"message": "Datasource added", "id": ds["id"], "datasource": ds}
        if parts[:3] == ["api", "dashboards", "uid"] and len(parts) == 4 and method == "GET":
            d = st.dashboards.get(parts[3])
            return (200, copy.deepcopy(d)) if d else (404, {"message": "Dashboard not found"})
        if parts == ["api", "dashboards", "db"] and method == "POST":
            dash = copy.deepcopy(body["dashboard"])
            uid = dash.get("uid")
            old = st.dashboards.get(uid)
            if old and not body.get("overwrite"):
                return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
            if body.get("folderUid") and body["folderUid"] not in st.folders:
                return 400, {"message": "folder not found"}
            dash["id"] = old["dashboard"]["id"] if old else st.next_id
            if not old:
                st.next_id += 1
            dash["version"] = (old["dashboard"]["version"] + 1) if old else 1
            st.dashboards[uid] = {
                "dashboard": dash,
                "meta": {"folderUid": body.get("folderUid", ""), "version": dash["version"], "message": body.get("message"),
                         "provisioned": False, "canSave": True, "slug": uid},
            }
            return 200, {"id": dash["id"], "uid": uid, "status": "success", "version": dash["version"]}
        return 404, {"message": f"not found: {method} {path}"}

    @staticmethod
    def _stored_datasource(body: dict[str, Any], ds_id: int) -> dict[str, Any]:
        ds = {k: v for k, v in body.items() if k != "secureJsonData"}
        ds["id"] = ds_id
        ds["orgId"] = 1
        ds["readOnly"] = False
        ds["secureJsonFields"] = {k: True for k in (body.get("secureJsonData") or {})}
        return ds
