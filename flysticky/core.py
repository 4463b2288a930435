"""The decision core: plain values in, a Decision out. No framework is imported here.

It reads top to bottom as the algorithm in the README:
skipped -> pinned here -> no valid pin (stamp) -> arrived by replay (re-pin)
-> body Fly cannot replay (serve off-pin) -> replay to the pinned machine.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import StickyConfig

log = logging.getLogger("flysticky")

#: Fly's proxy refuses to replay a request whose body is larger than this.
REPLAY_BODY_LIMIT = 1024 * 1024
#: Status of the answer that carries fly-replay; the proxy swallows it, so the
#: client never sees it. 307 with an empty body is Fly's convention.
REPLAY_STATUS = 307
REPLAY_HEADER = "fly-replay"
#: Request headers Fly's proxy adds to a request it delivers by replay, by a
#: replay-cache hit, to a substitute for an unavailable preferred machine, or by
#: a fallback. Such a request is never replayed again.
ARRIVAL_HEADERS = (  # failover signals first: they say the most about why
    "fly-preferred-instance-unavailable",
    "fly-replay-failed",
    "fly-replay-src",
    "fly-replay-cache-status",
)

# Real machine ids are 14 lowercase hex digits; echofly's tests use ids such as
# "test-machine-123". Nothing outside this grammar ever reaches a header.
_MACHINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_machine_id(value: str) -> bool:
    """True when ``value`` is something flysticky will pin to or put in a header."""
    return _MACHINE_ID.fullmatch(value) is not None


class HeaderLookup(Protocol):
    """What the core needs of request headers: case-insensitive ``get`` and ``in``."""

    def get(self, key: str, /) -> str | None: ...

    def __contains__(self, key: object, /) -> bool: ...


class ResponseHeaders(Protocol):
    """What the core needs of response headers (Sanic's and Werkzeug's both fit)."""

    def get(self, key: str, /) -> str | None: ...

    def add(self, key: str, value: str, /) -> None: ...

    def __setitem__(self, key: str, value: str, /) -> None: ...


class Outcome(enum.Enum):
    """What flysticky did with a request, and why."""

    SKIPPED = "skipped"  # the skipper said so: untouched
    PINNED = "pinned"  # the cookie names this machine: served
    STAMPED = "stamped"  # no valid cookie: served, cookie set to this machine
    REPLAYED = "replayed"  # the cookie names another machine: fly-replay there
    REPINNED = "repinned"  # arrived by replay/failover: served, cookie moved here
    OFF_PIN = "off_pin"  # body Fly cannot replay: served here, cookie kept


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request, as handlers see it (Sanic ``request.ctx.flysticky``,
    Quart ``g.flysticky``).

    ``set_cookie`` and ``replay`` are complete header values for the adapter to send.
    """

    outcome: Outcome
    machine_id: str
    pinned_to: str | None = None
    set_cookie: str | None = None
    replay: str | None = None
    arrived_by: str | None = None

    @property
    def serve(self) -> bool:
        """False only when the request must be answered with fly-replay."""
        return self.replay is None


class HeaderTable:
    """A case-insensitive lookup over (name, value) pairs, built on first use.

    For header types whose every ``get`` scans the whole list (Werkzeug's, so
    Quart's): the decisions that read several headers then pay for one pass, and
    the pinned path, which reads none but the cookie, pays for nothing.
    """

    __slots__ = ("_pairs", "_table")

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = pairs
        self._table: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        table = self._table
        if table is None:
            table = {}
            for name, value in self._pairs:
                table.setdefault(name.lower(), value)
            self._table = table
        return table

    def get(self, key: str, /) -> str | None:
        return self._lookup().get(key)

    def __contains__(self, key: object, /) -> bool:
        return key in self._lookup()


def machine_id_from_env(environ: Callable[[str], str | None] = os.environ.get) -> str | None:
    """This machine's id from ``FLY_MACHINE_ID``; None off Fly or when it is malformed."""
    return _checked_machine_id(environ("FLY_MACHINE_ID"))


def decider_for(config: StickyConfig, fly_machine_id: str | None) -> Decider | None:
    """The Decider for the machine ``FLY_MACHINE_ID`` names; None off Fly or when the
    value is malformed (flysticky then does nothing)."""
    machine_id = _checked_machine_id(fly_machine_id)
    return Decider(config, machine_id) if machine_id else None


def _checked_machine_id(value: str | None) -> str | None:
    if not value:
        return None
    if not is_machine_id(value):
        log.warning(
            "FLY_MACHINE_ID=%r is not a machine id (1-64 of A-Z a-z 0-9 - _); flysticky stays off",
            value,
        )
        return None
    return value


def private_cache_control(existing: str | None) -> str:
    """Cache-Control for a response that sets the cookie: no shared cache may keep it
    (HAProxy's ``nocache``), or one user's pin would be served to everyone."""
    if not existing:
        return "private"
    kept = [
        d.strip()
        for d in existing.split(",")
        if d.strip() and d.strip().split("=")[0].lower() not in ("public", "s-maxage")
    ]
    if not any(d.lower() in ("private", "no-store") for d in kept):
        kept.insert(0, "private")
    return ", ".join(kept)


def join_cookie_headers(values: list[str] | None) -> str | None:
    """One Cookie header from however many arrived (HTTP/2 and some test clients split
    cookies over several; RFC 9113 8.2.3 joins them with "; ")."""
    if not values:
        return None
    return values[0] if len(values) == 1 else "; ".join(values)


def apply_stamp(decision: Decision, headers: ResponseHeaders) -> None:
    """Add the decision's Set-Cookie, if any, to a response that is being served."""
    if decision.set_cookie is not None:
        headers.add("set-cookie", decision.set_cookie)
        headers["cache-control"] = private_cache_control(headers.get("cache-control"))


def _at_cookie_start(header: str, i: int) -> bool:
    """Whether position ``i`` (> 0) of a Cookie header starts a cookie name, rather
    than falling inside another cookie's name or value."""
    before = header[i - 1]
    if before == ";":
        return True
    if before not in " \t":
        return False
    if i == 1 or header[i - 2] == ";":  # the usual "; " separator
        return True
    return header[:i].rstrip(" \t")[-1:] in ("", ";")


def _is_https(headers: HeaderLookup) -> bool:
    proto = headers.get("x-forwarded-proto")
    return proto is not None and proto.split(",", 1)[0].strip().lower() == "https"


def _body_replayable(headers: HeaderLookup) -> bool:
    length = headers.get("content-length")
    if length is None:
        # HTTP/1.1: no Content-Length and no Transfer-Encoding means no body at all;
        # a chunked body has no length Fly can check, so it cannot be replayed.
        return headers.get("transfer-encoding") is None
    length = length.strip()
    return length.isascii() and length.isdigit() and int(length) <= REPLAY_BODY_LIMIT


#: Replay decisions are kept per target machine, and pins per raw Cookie header
#: (a browser sends the same header again and again); both are attacker-chosen,
#: so both tables are bounded, and only headers up to a size are remembered.
_REPLAY_CACHE_SIZE = 1024
_PIN_CACHE_SIZE = 4096
_PIN_CACHE_HEADER = 1024


class Decider:
    """StickyConfig compiled for one machine: every per-request value is precomputed,
    and every decision that does not depend on the cookie's value is made once."""

    def __init__(self, config: StickyConfig, machine_id: str) -> None:
        if not is_machine_id(machine_id):
            raise ValueError(
                f"machine_id={machine_id!r} is not allowed: 1 to 64 of A-Z a-z 0-9 - _"
            )
        self.config = config
        self.machine_id = machine_id
        self._skipper = config.skipper
        self._name_eq = config.cookie_name + "="
        self._pin_here = self._name_eq + machine_id
        self._pin_length = len(self._pin_here)
        self._replay_field = config.replay_mode + "="
        attributes = ""
        if config.max_age_seconds is not None:
            attributes += f"; Max-Age={config.max_age_seconds}"
        attributes += f"; Path={config.path}"
        if config.domain is not None:
            attributes += f"; Domain={config.domain}"
        if config.http_only:
            attributes += "; HttpOnly"
        attributes += f"; SameSite={config.same_site}"
        stamp = f"{config.cookie_name}={machine_id}{attributes}"
        self._pinned = Decision(Outcome.PINNED, machine_id, machine_id)
        self._skipped = Decision(Outcome.SKIPPED, machine_id)
        self._stamped_plain = Decision(Outcome.STAMPED, machine_id, None, stamp)
        self._stamped_secure = Decision(Outcome.STAMPED, machine_id, None, stamp + "; Secure")
        # A websocket handshake is answered by the server's upgrade machinery, not by a
        # response flysticky can add to; the page that opened it sets the pin.
        self._stamped_websocket = Decision(Outcome.STAMPED, machine_id)
        self._replays: dict[str, Decision] = {}
        self._pins: dict[str, str | None] = {}

    def read_pin(self, cookie_header: str) -> str | None:
        """The first value of our cookie that is a valid machine id, or None.

        One scan of the raw header for our cookie's name is far cheaper than parsing
        the whole cookie jar; a value equal to this machine's id skips the grammar check.
        """
        name_eq = self._name_eq
        after = len(name_eq)
        i = cookie_header.find(name_eq)
        while i >= 0:
            if i == 0 or _at_cookie_start(cookie_header, i):
                end = cookie_header.find(";", i + after)
                value = cookie_header[i + after : end] if end >= 0 else cookie_header[i + after :]
                if value == self.machine_id:
                    return value
                if value and (value[0] in ' \t"' or value[-1] in ' \t"'):
                    value = value.strip(" \t")
                    if len(value) >= 2 and value[0] == '"' == value[-1]:
                        value = value[1:-1]
                if _MACHINE_ID.fullmatch(value):
                    return value
            i = cookie_header.find(name_eq, i + 1)
        return None

    def _remembered_pin(self, cookie_header: str) -> str | None:
        pins = self._pins
        try:
            return pins[cookie_header]
        except KeyError:
            pass
        pin = self.read_pin(cookie_header)
        if len(cookie_header) <= _PIN_CACHE_HEADER:
            if len(pins) >= _PIN_CACHE_SIZE:
                pins.clear()
            pins[cookie_header] = pin
        return pin

    def _stamped(self, headers: HeaderLookup, is_websocket: bool) -> Decision:
        """The stamp for this request: Secure behind https (or as configured)."""
        if is_websocket:
            return self._stamped_websocket
        secure = self.config.secure
        if secure is None:
            secure = _is_https(headers)
        return self._stamped_secure if secure else self._stamped_plain

    def _replay(self, pin: str) -> Decision:
        decision = self._replays.get(pin)
        if decision is None:
            if len(self._replays) >= _REPLAY_CACHE_SIZE:
                self._replays.clear()
            decision = Decision(
                Outcome.REPLAYED, self.machine_id, pin, replay=self._replay_field + pin
            )
            self._replays[pin] = decision
        return decision

    def decide(
        self,
        request: Any,
        cookie_header: str | None,
        headers: HeaderLookup,
        is_websocket: bool = False,
    ) -> Decision:
        """Decide one request. ``request`` is only handed to the skipper."""
        if self._skipper is not None and self._skipper(request):
            return self._skipped
        pin = None
        if cookie_header:
            # The common case, inline: one find of "<name>=<this machine>" between
            # cookie boundaries. A cookie naming this machine wins over any other (say,
            # one set by a sibling domain); serving here is always safe. Not logged:
            # it would flood DEBUG.
            i = cookie_header.find(self._pin_here)
            if i >= 0:
                end = i + self._pin_length
                if (i == 0 or cookie_header[i - 1] in "; \t") and (
                    end == len(cookie_header) or cookie_header[end] in "; \t"
                ):
                    return self._pinned
            pin = self._remembered_pin(cookie_header)
        if pin is None:
            log.debug(
                "stamped: no valid %s cookie, pinned to %s", self._name_eq[:-1], self.machine_id
            )
            return self._stamped(headers, is_websocket)
        for name in ARRIVAL_HEADERS:
            if name in headers:
                # Replaying again could loop; and when the pinned machine is gone,
                # prefer_instance lands the request here: heal the session.
                log.info(
                    "repinned: session pinned to %s arrived here (%s) by %s; re-pinned to %s",
                    pin,
                    self.machine_id,
                    name,
                    self.machine_id,
                )
                return Decision(
                    Outcome.REPINNED,
                    self.machine_id,
                    pin,
                    self._stamped(headers, is_websocket).set_cookie,
                    arrived_by=name,
                )
        if not _body_replayable(headers):
            log.debug("off_pin: body too big or of unknown length to replay to %s", pin)
            return Decision(Outcome.OFF_PIN, self.machine_id, pin)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("replayed: session pinned to %s", pin)
        return self._replay(pin)
