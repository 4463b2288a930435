"""fly-replay instructions as Fly's proxy reads them: header form and JSON form."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..regions import REGION_ALIASES

JSON_CONTENT_TYPE = "application/vnd.fly.replay+json"
FALLBACKS = ("force_self", "prefer_self")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")
_FIELDS = (
    "instance",
    "prefer_instance",
    "region",
    "app",
    "state",
    "elsewhere",
    "timeout",
    "fallback",
)


class ReplayError(ValueError):
    """A fly-replay the proxy refuses; the message says why."""


@dataclass(frozen=True)
class Transform:
    path: str | None = None
    delete_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PathCache:
    pattern: str | None = None  # host/path/* the target should receive directly
    ttl: int | None = None
    invalidate: bool = False


@dataclass(frozen=True)
class Replay:
    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    app: str | None = None
    state: str | None = None
    elsewhere: bool = False
    timeout: float | None = None  # seconds
    fallback: str | None = None
    transform: Transform = field(default_factory=Transform)
    cache: PathCache = field(default_factory=PathCache)

    @property
    def cacheable(self) -> bool:
        """Fly records a session replay-cache entry only for a plain routing replay."""
        return (
            self.state is None
            and self.timeout is None
            and self.fallback is None
            and self.transform == Transform()
        )


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ReplayError(f"timeout={text!r}: expected a duration such as 10s or 800ms")
    number, unit = float(match.group(1)), match.group(2)
    return number / 1000 if unit == "ms" else number * 60 if unit == "m" else number


def _split_pairs(header: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(header):
        eq = header.find("=", i)
        if eq < 0:
            raise ReplayError(f"fly-replay {header!r}: {header[i:].strip()!r} is not field=value")
        name = header[i:eq].strip().lower()
        j = eq + 1
        if j < len(header) and header[j] == '"':
            close = header.find('"', j + 1)
            if close < 0:
                raise ReplayError(f"fly-replay {header!r}: unterminated quoted value")
            value = header[j + 1 : close]
            end = header.find(";", close)
        else:
            end = header.find(";", j)
            value = header[j : end if end >= 0 else None].strip()
        pairs.append((name, value))
        i = len(header) if end < 0 else end + 1
        while i < len(header) and header[i] in " \t":
            i += 1
    return pairs


def _build(fields: dict[str, object], transform: Transform, cache: PathCache) -> Replay:
    def text(name: str) -> str | None:
        value = fields.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value or not _is_header_value(value):
            raise ReplayError(f"{name}={value!r}: expected a non-empty string")
        return value

    region = text("region") or ""
    regions = tuple(r.strip().lower() for r in region.split(",") if r.strip())
    elsewhere = (text("elsewhere") or "false").lower()
    if elsewhere not in ("true", "false"):
        raise ReplayError(f"elsewhere={elsewhere!r}: expected true or false")
    timeout = text("timeout")
    replay = Replay(
        instance=text("instance"),
        prefer_instance=text("prefer_instance"),
        regions=regions,
        app=text("app"),
        state=text("state"),
        elsewhere=elsewhere == "true",
        timeout=parse_duration(timeout) if timeout is not None else None,
        fallback=text("fallback"),
        transform=transform,
        cache=cache,
    )
    if replay.instance and replay.prefer_instance:
        raise ReplayError("instance and prefer_instance cannot be combined")
    if replay.instance and replay.regions:
        raise ReplayError("instance names one machine; region cannot narrow it")
    if replay.fallback is not None and replay.fallback not in FALLBACKS:
        raise ReplayError(f"fallback={replay.fallback!r}: expected force_self or prefer_self")
    if not (replay.instance or replay.prefer_instance or replay.regions or replay.app) and not (
        replay.elsewhere or replay.transform != Transform()
    ):
        raise ReplayError("a fly-replay must name an instance, a region, an app or elsewhere")
    return replay


def parse_header(header: str) -> Replay:
    """Parse ``fly-replay: field=value;field="a,b"``."""
    fields: dict[str, object] = {}
    for name, value in _split_pairs(header):
        if name not in _FIELDS:
            raise ReplayError(f"fly-replay field {name!r} is unknown")
        fields[name] = value
    return _build(fields, Transform(), PathCache())


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ReplayError(f"{where}={value!r}: expected a list of non-empty strings")
    return tuple(value)


def _transform(raw: Any) -> Transform:
    if raw is None:
        return Transform()
    if not isinstance(raw, dict):
        raise ReplayError(f"transform={raw!r}: expected an object")
    unknown = set(raw) - {"path", "delete_headers", "set_headers"}
    if unknown:
        raise ReplayError(f"transform fields {sorted(unknown)} are unknown")
    path = raw.get("path")
    if path is not None and not is_path(path):
        raise ReplayError(
            f"transform.path={path!r}: expected a path starting with one '/', such as /api?x=1"
        )
    set_headers = raw.get("set_headers") or []
    if isinstance(set_headers, dict):
        set_headers = [{"name": k, "value": v} for k, v in set_headers.items()]
    if not isinstance(set_headers, list) or not all(
        isinstance(h, dict)
        and set(h) == {"name", "value"}
        and _is_token(h["name"])
        and _is_header_value(h["value"])
        for h in set_headers
    ):
        raise ReplayError(
            f"transform.set_headers={set_headers!r}: expected "
            '[{"name": header name, "value": header value}, ...]'
        )
    deleted = _strings("transform.delete_headers", raw.get("delete_headers"))
    return Transform(
        path=path,
        delete_headers=tuple(h.lower() for h in deleted),
        set_headers=tuple((h["name"], h["value"]) for h in set_headers),
    )


def _path_cache(raw: Any) -> PathCache:
    if raw is None:
        return PathCache()
    if not isinstance(raw, dict):
        raise ReplayError(f"cache={raw!r}: expected an object")
    unknown = set(raw) - {"prefix", "ttl", "invalidate"}
    if unknown:
        raise ReplayError(f"cache fields {sorted(unknown)} are unknown")
    prefix, ttl, invalidate = raw.get("prefix"), raw.get("ttl"), raw.get("invalidate", False)
    if prefix is not None and (not isinstance(prefix, str) or not _is_header_value(prefix)):
        raise ReplayError(f"cache.prefix={prefix!r}: expected a host/path pattern")
    if ttl is not None:
        ttl = parse_ttl(ttl, "cache.ttl")
    if not isinstance(invalidate, bool):
        raise ReplayError(f"cache.invalidate={invalidate!r}: expected true or false")
    return PathCache(pattern=prefix, ttl=ttl, invalidate=invalidate)


def parse_ttl(value: object, where: str = "fly-replay-cache-ttl-secs") -> int:
    """A whole positive number of seconds, from JSON or from a response header."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip()) if len(value.strip()) < 10 else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10**9:
        raise ReplayError(f"{where}={value!r}: expected a whole number of seconds, 1 or more")
    return value


def parse_json(body: bytes) -> Replay:
    """Parse the ``application/vnd.fly.replay+json`` response body."""
    try:
        data = json.loads(body)
    except ValueError as error:
        raise ReplayError(f"fly-replay JSON body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ReplayError("fly-replay JSON body must be an object")
    unknown = set(data) - {*_FIELDS, "transform", "cache"}
    if unknown:
        raise ReplayError(f"fly-replay JSON fields {sorted(unknown)} are unknown")
    region = data.get("region")
    if isinstance(region, list):
        data["region"] = ",".join(_strings("region", region))
    elsewhere = data.get("elsewhere", False)
    if not isinstance(elsewhere, bool):
        raise ReplayError(f"elsewhere={elsewhere!r}: expected true or false")
    data["elsewhere"] = "true" if elsewhere else "false"
    return _build(data, _transform(data.get("transform")), _path_cache(data.get("cache")))


def is_path(value: object) -> bool:
    """An origin-form request target: the proxy puts it after its own host, never a new host."""
    return (
        isinstance(value, str)
        and value.startswith("/")
        and not value.startswith("//")
        and value.isascii()
        and all(32 < ord(c) < 127 for c in value)
        and "\\" not in value
    )


def _is_token(value: object) -> bool:
    return (
        isinstance(value, str)
        and bool(value)
        and value.isascii()
        and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value)
    )


def _is_header_value(value: object) -> bool:
    return isinstance(value, str) and all(c == "\t" or 32 <= ord(c) < 127 for c in value)


def region_matches(wanted: str, region: str) -> bool:
    if wanted == "any":
        return True
    return region == wanted or region in REGION_ALIASES.get(wanted, frozenset())
