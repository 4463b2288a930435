"""Fly's replay cache: session rules from fly.toml, and path entries set by responses."""

from __future__ import annotations

import fnmatch
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any


class FlyTomlError(ValueError):
    """A fly.toml the emulator cannot use; the message names the key."""


@dataclass(frozen=True)
class CacheRule:
    path_prefix: str
    ttl_seconds: int
    type: str  # "cookie" or "header"
    name: str
    allow_bypass: bool = False

    def matches(self, host: str, path: str) -> bool:
        if self.path_prefix.startswith("/"):
            return path.startswith(self.path_prefix)
        rule_host, _, rule_path = self.path_prefix.partition("/")
        return host == rule_host.lower() and path.startswith("/" + rule_path)

    def key(self, headers: Mapping[str, str]) -> str | None:
        if self.type == "header":
            return headers.get(self.name)
        raw = headers.get("cookie")
        if not raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return None
        morsel = jar.get(self.name)
        return morsel.value if morsel is not None else None


def _rule(entry: Any, index: int) -> CacheRule:
    where = f"http_service.http_options.replay_cache[{index}]"
    if not isinstance(entry, dict):
        raise FlyTomlError(f"{where} must be a table")
    unknown = set(entry) - {"path_prefix", "ttl_seconds", "type", "name", "allow_bypass"}
    if unknown:
        raise FlyTomlError(f"{where}: unknown keys {sorted(unknown)}")
    prefix = entry.get("path_prefix")
    if not isinstance(prefix, str) or not prefix or ":" in prefix.split("/")[0]:
        raise FlyTomlError(f"{where}.path_prefix={prefix!r}: a path or host/path, with no port")
    ttl = entry.get("ttl_seconds")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 10:
        raise FlyTomlError(f"{where}.ttl_seconds={ttl!r}: a whole number of seconds, at least 10")
    kind = entry.get("type")
    if kind not in ("cookie", "header"):
        raise FlyTomlError(f"{where}.type={kind!r}: 'cookie' or 'header'")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise FlyTomlError(f"{where}.name={name!r}: the cookie or header name")
    bypass = entry.get("allow_bypass", False)
    if not isinstance(bypass, bool):
        raise FlyTomlError(f"{where}.allow_bypass={bypass!r}: true or false")
    return CacheRule(prefix, ttl, kind, name.lower() if kind == "header" else name, bypass)


def load_rules(fly_toml: Path) -> list[CacheRule]:
    """The session replay-cache rules of an app's fly.toml."""
    try:
        data = tomllib.loads(fly_toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise FlyTomlError(f"{fly_toml}: {error}") from None
    service = data.get("http_service") or {}
    options = service.get("http_options") or {}
    entries = options.get("replay_cache") or []
    if not isinstance(entries, list):
        raise FlyTomlError("http_service.http_options.replay_cache must be an array of tables")
    return [_rule(entry, i) for i, entry in enumerate(entries)]


class ReplayCache:
    """What the proxy remembers of earlier replays, with expiry."""

    def __init__(self, rules: list[CacheRule], clock: Callable[[], float] = time.monotonic):
        self.rules = rules
        self._clock = clock
        self._sessions: dict[tuple[CacheRule, str], tuple[str, float]] = {}
        self._paths: dict[str, tuple[str, float]] = {}

    def rule_for(self, host: str, path: str) -> CacheRule | None:
        matching = [r for r in self.rules if r.matches(host, path)]
        return max(matching, key=lambda r: len(r.path_prefix), default=None)

    def lookup_session(self, rule: CacheRule, key: str) -> str | None:
        entry = self._sessions.get((rule, key))
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._sessions[(rule, key)]
            return None
        return entry[0]

    def remember_session(self, rule: CacheRule, key: str, machine_id: str) -> None:
        self._sessions[(rule, key)] = (machine_id, self._clock() + rule.ttl_seconds)

    def forget_session(self, rule: CacheRule, key: str) -> None:
        self._sessions.pop((rule, key), None)

    def lookup_path(self, host: str, path: str) -> tuple[str, str] | None:
        """(pattern, machine id) of a live path entry matching host+path."""
        now = self._clock()
        for pattern, (machine_id, expires) in list(self._paths.items()):
            if expires <= now:
                del self._paths[pattern]
            elif fnmatch.fnmatchcase(f"{host}{path}", pattern) or fnmatch.fnmatchcase(
                path, pattern
            ):
                return pattern, machine_id
        return None

    def remember_path(self, pattern: str, machine_id: str, ttl: int) -> None:
        self._paths[pattern] = (machine_id, self._clock() + max(ttl, 1))

    def forget_path(self, pattern: str) -> None:
        self._paths.pop(pattern, None)
