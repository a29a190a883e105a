"""The secret store: MQTT passwords and Wi-Fi keys, outside the registry and out of git.

One JSON file per entry, `<root>/<ref>.json` (e.g. `mqtt/buoy-07`, `wifi/copenhagen`),
mode 0600 in directories of mode 0700. The registry keeps only the reference. Nothing here
ever prints a value; `Secret` hides itself from repr/str so a stray log line cannot leak it.
"""

from __future__ import annotations

import json
import os
import re
import secrets as _secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

REF_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}/[a-z][a-z0-9-]{0,63}$")


class SecretError(ValueError):
    pass


class Secret(str):
    """A string that does not show itself in repr()/format; use `.reveal()` where it must go."""

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def reveal(self) -> str:
        return str.__str__(self)


def new_password() -> str:
    # 32 url-safe characters: ~190 bits, no characters that need escaping in configs.
    return _secrets.token_urlsafe(24)


@dataclass(frozen=True)
class SecretStore:
    root: Path

    def path(self, ref: str) -> Path:
        if not REF_RE.match(ref):
            raise SecretError(f"secret reference {ref!r} is not '<kind>/<name>' (e.g. mqtt/buoy-07)")
        return self.root / f"{ref}.json"

    def exists(self, ref: str) -> bool:
        return self.path(ref).exists()

    def get(self, ref: str) -> dict[str, Secret]:
        p = self.path(ref)
        try:
            st = p.stat()
        except FileNotFoundError:
            kind, name = ref.split("/", 1)
            how = (f"`twinedge node wifi {name} --ssid NAME`" if kind == "wifi"
                   else "`twinedge broker render --city CITY --out DIR` (creates missing passwords)")
            raise SecretError(f"secret {ref!r} not found in {self.root}; create it with {how}") from None
        if st.st_mode & 0o077:
            raise SecretError(f"{p} is readable by others (mode {st.st_mode & 0o777:o}); run `chmod 600 {p}`")
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise SecretError(f"{p}: unreadable secret ({type(e).__name__}); restore it or recreate it") from None
        if not isinstance(data, dict):
            raise SecretError(f"{p}: secret must be a JSON object")
        return {str(k): Secret(str(v)) for k, v in data.items()}

    def put(self, ref: str, data: dict[str, str]) -> Path:
        p = self.path(ref)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        p.parent.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".", suffix=".tmp")  # mkstemp creates 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({k: (v.reveal() if isinstance(v, Secret) else v) for k, v in data.items()}, f)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    def ensure_mqtt(self, username: str) -> str:
        """The reference of `username`'s MQTT password, creating a fresh password if none exists."""
        ref = f"mqtt/{username}"
        if not self.exists(ref):
            self.put(ref, {"username": username, "password": new_password()})
        return ref

    def rotate_mqtt(self, username: str) -> str:
        ref = f"mqtt/{username}"
        self.put(ref, {"username": username, "password": new_password()})
        return ref

    def list(self, kind: str) -> list[str]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return sorted(f"{kind}/{p.stem}" for p in folder.glob("*.json"))
