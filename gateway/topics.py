"""The topic tree `twin/<city>/<domain>/<node>/{up,status,cfg,cmd}`."""

from __future__ import annotations

from typing import NamedTuple

from gateway.schema import DOMAINS, NAME_RE

ROOT = "twin"
KINDS = ("up", "status", "cfg", "cmd")


class Topic(NamedTuple):
    city: str
    domain: str
    node: str
    kind: str


class TopicError(ValueError):
    pass


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT:
        raise TopicError(f"topic {topic!r} is not twin/<city>/<domain>/<node>/<kind>")
    _, city, domain, node, kind = parts
    if not NAME_RE.match(city):
        raise TopicError(f"city {city!r} in topic is not a valid name")
    if domain not in DOMAINS:
        raise TopicError(f"domain {domain!r} in topic is not one of {', '.join(DOMAINS)}")
    if not NAME_RE.match(node):
        raise TopicError(f"node {node!r} in topic is not a valid name")
    if kind not in KINDS:
        raise TopicError(f"topic kind {kind!r} is not one of {', '.join(KINDS)}")
    return Topic(city, domain, node, kind)


def topic_for(city: str, domain: str, node: str, kind: str) -> str:
    return f"{ROOT}/{city}/{domain}/{node}/{kind}"


def up_filter(city: str, share_group: str | None = None) -> str:
    base = f"{ROOT}/{city}/+/+/up"
    return f"$share/{share_group}/{base}" if share_group else base


def status_filter(city: str) -> str:
    return f"{ROOT}/{city}/+/+/status"
