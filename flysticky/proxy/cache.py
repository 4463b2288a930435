"""Fly's replay cache: session rules from fly.toml, and path entries set by responses.

A cookie rule's key is read the way a proxy reads a Cookie header, not the way
http.cookies does (which refuses names such as ``$x`` and whole headers over one odd
pair): split on ``;``, spaces and tabs trimmed around names and values (RFC 6265
5.2), one pair of double quotes taken off the value. When the name comes more than
once the FIRST value keys the cache. Fly does not document which one it takes: the
emulator picks one so its behaviour is repeatable, flysticky must not depend on the
choice, and its own tests send duplicates in both orders.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

_K = TypeVar("_K")


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
        return cookie_value(headers.get("cookie") or "", self.name)


def cookie_value(header: str, name: str) -> str | None:
    """The value of the first cookie called ``name`` in a Cookie header (see above)."""
    for pair in header.split(";"):
        key, sep, value = pair.partition("=")
        if not sep or key.strip(" \t") != name:
            continue
        value = value.strip(" \t")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        return value
    return None


#: Entries the cache holds at most, per kind: a client sending a new cookie value with
#: every request must not grow the proxy without bound (Fly's docs give no figure).
MAX_ENTRIES = 10_000


class ReplayCache:
    """What the proxy remembers of earlier replays, with expiry and a size bound.

    Reads and writes only memory; the clock is injectable so the rules are tested
    without waiting. When full, the entry that expires first goes.
    """

    def __init__(
        self,
        rules: list[CacheRule],
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.rules = rules
        self._clock = clock
        self._max = max_entries
        self._sessions: dict[tuple[CacheRule, str], tuple[str, float]] = {}
        self._paths: dict[str, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self._sessions) + len(self._paths)

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
        self._sessions.pop((rule, key), None)
        self._make_room(self._sessions)
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
        self._paths.pop(pattern, None)
        self._make_room(self._paths)
        self._paths[pattern] = (machine_id, self._clock() + max(ttl, 1))

    def forget_path(self, pattern: str) -> None:
        self._paths.pop(pattern, None)

    def forget_machine(self, machine_id: str) -> None:
        """Drop every entry naming a machine that is gone."""
        for table in (self._sessions, self._paths):
            for key in [k for k, (target, _) in table.items() if target == machine_id]:
                del table[key]  # type: ignore[arg-type]

    def _make_room(self, table: dict[_K, tuple[str, float]]) -> None:
        if len(table) < self._max:
            return
        now = self._clock()
        for key in [k for k, (_, expires) in table.items() if expires <= now]:
            del table[key]
        while len(table) >= self._max:
            del table[min(table, key=lambda k: table[k][1])]
