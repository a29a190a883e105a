"""City pairs: which cities exist, who is whose partner, where their InfluxDB and Grafana live."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
DEFAULT_CITIES = Path(__file__).with_name("cities.toml")


class ConfigError(ValueError):
    """A one-line, technician-readable reason why the city config cannot be used."""


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    title: str
    partner: str = Field(pattern=NAME_PATTERN)
    domains: list[Literal["marine", "mobility"]] = Field(min_length=1)
    influx_url: str = Field(description="this city's InfluxDB as seen by the Grafana servers (home and partner)")
    database: str = "twinedge"
    grafana_url: str = ""
    folder: str = "TwinEdge"
    folder_uid: str = "twinedge"


class Cities(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cities: dict[str, City]

    def get(self, name: str) -> City:
        try:
            return self.cities[name]
        except KeyError:
            known = ", ".join(sorted(self.cities))
            raise ConfigError(f"unknown city {name!r}; known cities: {known} (add it to the cities file)") from None

    def partner_of(self, city: City) -> City:
        return self.get(city.partner)

    def pair(self, city: City) -> tuple[City, City]:
        """The pair in a fixed order (by name), so both cities render identical dashboards."""
        a, b = sorted((city, self.partner_of(city)), key=lambda c: c.name)
        return a, b


def load_cities(path: Path | None = None) -> Cities:
    path = path or DEFAULT_CITIES
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror}); pass --cities FILE") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    table = raw.get("cities")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: needs at least one [cities.<name>] table")
    try:
        cities = Cities.model_validate({"cities": {k: {"name": k, **v} for k, v in table.items()}})
    except (ValidationError, TypeError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"][1:])
            raise ConfigError(f"{path}: cities.{loc}: {err['msg']}") from None
        raise ConfigError(f"{path}: each city must be a table") from None
    for c in cities.cities.values():
        partner = cities.cities.get(c.partner)
        if partner is None:
            raise ConfigError(f"{path}: city {c.name} names partner {c.partner!r}, which is not defined")
        if partner.partner != c.name:
            raise ConfigError(f"{path}: {c.name} names {partner.name} as partner but {partner.name} names {partner.partner}")
        if partner.name == c.name:
            raise ConfigError(f"{path}: city {c.name} cannot be its own partner")
        if sorted(partner.domains) != sorted(c.domains):
            raise ConfigError(f"{path}: partners {c.name} and {partner.name} must share the same domains")
    return cities
