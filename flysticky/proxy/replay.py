"""fly-replay instructions as Fly's proxy reads them: header form and JSON form."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

JSON_CONTENT_TYPE = "application/vnd.fly.replay+json"
FALLBACKS = ("force_self", "prefer_self")
#: Region aliases Fly accepts in ``region=``; the emulator knows these groups.
REGION_ALIASES: dict[str, frozenset[str]] = {
    "us": frozenset({"iad", "ord", "dfw", "lax", "sjc", "sea", "ewr", "atl", "bos", "den", "mia"}),
    "na": frozenset(
        {"iad", "ord", "dfw", "lax", "sjc", "sea", "ewr", "atl", "bos", "den", "mia", "yyz", "yul"}
    ),
    "eu": frozenset({"ams", "arn", "cdg", "fra", "lhr", "mad", "otp", "waw"}),
    "sa": frozenset({"gru", "bog", "eze", "gig", "scl"}),
    "apac": frozenset({"nrt", "hkg", "sin", "syd", "bom", "sjc"}),
}
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
        if not isinstance(value, str) or not value:
            raise ReplayError(f"{name}={value!r}: expected a non-empty string")
        return value

    regions: tuple[str, ...] = ()
    region = fields.get("region")
    if isinstance(region, str):
        regions = tuple(r.strip().lower() for r in region.split(",") if r.strip())
    elif isinstance(region, list):
        regions = tuple(str(r).strip().lower() for r in region)
    elsewhere = fields.get("elsewhere", False)
    if isinstance(elsewhere, str):
        elsewhere = elsewhere.lower() == "true"
    timeout = fields.get("timeout")
    replay = Replay(
        instance=text("instance"),
        prefer_instance=text("prefer_instance"),
        regions=regions,
        app=text("app"),
        state=text("state"),
        elsewhere=bool(elsewhere),
        timeout=parse_duration(str(timeout)) if timeout is not None else None,
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
    raw_transform = data.get("transform") or {}
    raw_cache = data.get("cache") or {}
    if not isinstance(raw_transform, dict) or not isinstance(raw_cache, dict):
        raise ReplayError("transform and cache must be objects")
    set_headers = raw_transform.get("set_headers") or []
    if isinstance(set_headers, dict):
        set_headers = [{"name": k, "value": v} for k, v in set_headers.items()]
    transform = Transform(
        path=raw_transform.get("path"),
        delete_headers=tuple(str(h).lower() for h in raw_transform.get("delete_headers") or ()),
        set_headers=tuple((str(h["name"]), str(h["value"])) for h in set_headers),
    )
    cache = PathCache(
        pattern=raw_cache.get("prefix"),
        ttl=raw_cache.get("ttl"),
        invalidate=bool(raw_cache.get("invalidate", False)),
    )
    return _build(data, transform, cache)


def region_matches(wanted: str, region: str) -> bool:
    if wanted == "any":
        return True
    return region == wanted or region in REGION_ALIASES.get(wanted, frozenset())
