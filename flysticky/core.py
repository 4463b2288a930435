"""The decision core: plain values in, a Decision out. No framework is imported here.

It reads top to bottom as the algorithm in the README:
skipped -> pinned here -> no valid pin (stamp) -> arrived by replay (re-pin)
-> body Fly cannot replay (serve off-pin) -> replay to the pinned machine.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from inspect import isasyncgen, isawaitable
from typing import Any, NoReturn, Protocol

from .config import StickyConfig
from .owners import Owners, is_machine_id, session_machine

log = logging.getLogger("flysticky")

#: Fly's proxy refuses to replay a request whose body is larger than this.
REPLAY_BODY_LIMIT = 1024 * 1024
#: Status of the answer that carries fly-replay; the proxy swallows it, so the
#: client never sees it. 307 with an empty body is Fly's convention.
REPLAY_STATUS = 307
REPLAY_HEADER = "fly-replay"
#: The ``state`` a replay carries when our cookie arrived with two different values:
#: it makes the replay one Fly's proxy does not cache.
AMBIGUOUS_REPLAY_STATE = "state=flysticky-duplicate-cookie"
#: The ``state`` of a replay routed by a key (or by a session id when our cookie is
#: present too): Fly's replay cache keys on one cookie or header value per client, and a
#: client visits many keys, so no cache entry could be right for all of them.
KEY_REPLAY_STATE = "state=flysticky-key"
#: The request header on a request flysticky forwarded over the private network: the
#: machine it came from. Any client can send it, so it counts only where forwarding
#: does: on a body too big to replay, which it then keeps from being forwarded again.
FORWARDED_HEADER = "flysticky-forwarded-from"
#: The request header with which Fly's proxy says how its replay cache delivered a request.
CACHE_STATUS_HEADER = "fly-replay-cache-status"
#: Request headers Fly's proxy adds to a request it delivers by replay, by a
#: replay-cache hit, to a substitute for an unavailable preferred machine, or by
#: a fallback. Such a request is never replayed again.
ARRIVAL_HEADERS = (  # failover signals first: they say the most about why
    "fly-preferred-instance-unavailable",
    "fly-replay-failed",
    "fly-replay-src",
    CACHE_STATUS_HEADER,
)
#: The arrival headers that stop a request routed by key or session id. A replay-cache
#: hit does not: key replays are never cached, so a hit on such a request came from
#: another rule (the visitor cookie's, at "/"), which knows nothing of the key's owner.
#: Replaying it once is safe: the owner sees fly-replay-src.
ROUTED_ARRIVAL_HEADERS = tuple(h for h in ARRIVAL_HEADERS if h != CACHE_STATUS_HEADER)
#: The values of CACHE_STATUS_HEADER; anything else is counted as "other" (a metric's
#: label must take few values).
CACHE_STATUSES = ("hit", "miss", "bypass")
_CACHE_STATUS_RAW = CACHE_STATUS_HEADER.encode()


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
    FORWARDED = "forwarded"  # body Fly cannot replay: forwarded to its machine over 6PN
    UNOWNED = "unowned"  # a key or session id whose machine is unknown, gone, or was
    # already tried (arrived by replay): served here


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request, as handlers see it (Sanic ``request.ctx.flysticky``,
    Quart ``g.flysticky``).

    ``pinned_to`` is the machine the cookie names: the last valid value of the cookie
    when it arrived more than once (a stray duplicate for a parent domain or a deeper
    path sorts first), so every machine reads a browser's header alike and it sticks to
    one. A replay is never aimed at ``machine_id`` itself. When the cookie arrived with
    values that differ (however spaced or quoted), ``replay`` ends in
    ``;state=flysticky-duplicate-cookie``: Fly's replay cache keys on the cookie's value
    and does not keep a replay that carries ``state``, so such a request cannot move
    other sessions' cache entries. A re-pin of such a request also sends
    ``expire_cookie`` before ``set_cookie``: the cookie is set anew, so the browser
    lists it after an older stray and the pin is ours again (a stray naming a machine
    that is gone cannot keep a session bouncing).

    ``set_cookie`` and ``replay`` are complete header values for the adapter to send.

    A request routed by ``StickyConfig.key`` carries its ``key`` and ``routed_by="key"``;
    one routed by a session id, ``routed_by`` = the session header's name. Then
    ``pinned_to`` is the machine that owns the key or that the id names (None while the
    app's machines are not known yet), and a replay ends in ``;state=flysticky-key``
    when Fly must not cache it (see KEY_REPLAY_STATE). ``OFF_PIN`` becomes ``FORWARDED``
    once the adapter has forwarded the request to ``pinned_to`` over the private network;
    an ``OFF_PIN`` whose ``arrived_by`` is FORWARDED_HEADER was forwarded here already and
    is served here.
    """

    outcome: Outcome
    machine_id: str
    pinned_to: str | None = None
    set_cookie: str | None = None
    replay: str | None = None
    arrived_by: str | None = None
    #: A Set-Cookie that expires our cookie just before ``set_cookie`` sets it again: sent
    #: on a re-pin when the cookie arrived with other values (see above).
    expire_cookie: str | None = None
    #: What routed the request when not the visitor cookie: "key", or the session header.
    routed_by: str | None = None
    #: The affinity key ``StickyConfig.key`` named for this request.
    key: str | None = None

    @property
    def serve(self) -> bool:
        """False only when the request must be answered with fly-replay."""
        return self.replay is None


class Tally:
    """What one app's flysticky decided, counted in plain ints (flysticky.metrics reads
    them when Fly scrapes). Kept only when StickyConfig.metrics_port is set; it lives as
    long as the app, across server starts, so its counters only grow.

    No label carries a session, a key or a machine id: Fly adds ``instance`` itself, and
    drops series of very high cardinality.
    """

    __slots__ = ("cache_arrivals", "decisions", "forwards", "pinned", "repins")

    def __init__(self) -> None:
        #: Requests pinned here by the visitor cookie: the hot path, counted apart.
        self.pinned = 0
        #: Every other decision, by (outcome, routed_by: "cookie", "key" or "session").
        self.decisions: dict[tuple[str, str], int] = {}
        #: Re-pins by the arrival header that caused them.
        self.repins: dict[str, int] = {}
        #: CACHE_STATUS_HEADER on arrival, by value (CACHE_STATUSES, or "other").
        self.cache_arrivals: dict[str, int] = {}
        #: Bodies too big to replay, by what became of them: "forwarded", "failed" (the
        #: other machine took the request but no answer came back) or "served_here".
        self.forwards: dict[str, int] = {}

    def count(self, decision: Decision) -> None:
        """Count a decision that is not the shared cookie-pinned one."""
        routed_by = decision.routed_by
        via = "cookie" if routed_by is None else "key" if routed_by == "key" else "session"
        key = (decision.outcome.value, via)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if decision.outcome is Outcome.REPINNED and decision.arrived_by is not None:
            self.repins[decision.arrived_by] = self.repins.get(decision.arrived_by, 0) + 1

    def count_pinned(self, cache_status: str | None) -> None:
        """Count what the counting ``decide`` counts for a pinned decision an adapter made
        without it (the raw-cookie shortcut), given the request's CACHE_STATUS_HEADER."""
        self.pinned += 1
        if cache_status is not None:
            self.arrived(cache_status)

    def count_pinned_raw(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """``count_pinned`` over an ASGI scope's raw headers (lowercase names, bytes): a
        scan that builds nothing, for adapters that hold them."""
        for name, value in headers:
            if name == _CACHE_STATUS_RAW:
                return self.count_pinned(value.decode("latin-1"))
        return self.count_pinned(None)

    def arrived(self, cache_status: str) -> None:
        status = cache_status.strip().lower()
        if status not in CACHE_STATUSES:
            status = "other"
        self.cache_arrivals[status] = self.cache_arrivals.get(status, 0) + 1

    def forwarded(self, result: str) -> None:
        self.forwards[result] = self.forwards.get(result, 0) + 1


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


def decider_for(
    config: StickyConfig, fly_machine_id: str | None, tally: Tally | None = None
) -> Decider | None:
    """The Decider for the machine ``FLY_MACHINE_ID`` names; None off Fly or when the
    value is malformed (flysticky then does nothing)."""
    machine_id = _checked_machine_id(fly_machine_id)
    return Decider(config, machine_id, tally) if machine_id else None


#: Malformed FLY_MACHINE_ID values already warned about: a test client that starts
#: the app per request would otherwise log the same warning on every request.
_warned_machine_ids: set[str] = set()


def _checked_machine_id(value: str | None) -> str | None:
    if not value:
        return None
    if not is_machine_id(value):
        if value in _warned_machine_ids:
            return None
        _warned_machine_ids.add(value)
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
        if decision.expire_cookie is not None:
            headers.add("set-cookie", decision.expire_cookie)
        headers.add("set-cookie", decision.set_cookie)
        headers["cache-control"] = private_cache_control(headers.get("cache-control"))


def cookie_values(cookie_header: str, name: str) -> list[str]:
    """Every value of cookie ``name`` in a Cookie header, in order: the one parsing rule
    flysticky has. Cookies are split on ";"; a name is trimmed of whitespace and ends at
    the first "="; a value loses surrounding spaces and tabs and one pair of double quotes
    (RFC 6265 5.2 trims names and values). One pass: linear in the header's size.
    """
    values = []
    for part in cookie_header.split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == name:
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == '"' == value[-1]:
                value = value[1:-1]
            values.append(value)
    return values


def _loosely(value: str) -> str:
    """A value as the most lenient parser would read it (every kind of whitespace
    trimmed, one pair of quotes dropped): what another proxy might key a cache on."""
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == '"' == value[-1] else value


def _is_https(headers: HeaderLookup) -> bool:
    proto = headers.get("x-forwarded-proto")
    return proto is not None and proto.split(",", 1)[0].strip().lower() == "https"


_LIMIT_DIGITS = len(str(REPLAY_BODY_LIMIT))


def _body_replayable(headers: HeaderLookup) -> bool:
    length = headers.get("content-length")
    if length is None:
        # HTTP/1.1: no Content-Length and no Transfer-Encoding means no body at all;
        # a chunked body has no length Fly can check, so it cannot be replayed.
        return headers.get("transfer-encoding") is None
    digits = length.strip(" \t")
    if not (digits.isascii() and digits.isdigit()):
        return False
    # Compared as text first: int() of a 5,000-digit string raises (Python's limit).
    digits = digits.lstrip("0")
    return len(digits) <= _LIMIT_DIGITS and int(digits or "0") <= REPLAY_BODY_LIMIT


#: Replay decisions are kept per target machine, pins per raw Cookie header (a browser
#: sends the same header again and again), routed decisions per key; all are
#: attacker-chosen, so every table is bounded, and only values up to a size are kept.
_REPLAY_CACHE_SIZE = 1024
_PIN_CACHE_SIZE = 4096
_PIN_CACHE_HEADER = 1024
_ROUTED_CACHE_SIZE = 4096
_ROUTED_CACHE_KEY = 256


class Decider:
    """StickyConfig compiled for one machine: every per-request value is precomputed,
    and every decision that does not depend on the cookie's value is made once."""

    def __init__(self, config: StickyConfig, machine_id: str, tally: Tally | None = None) -> None:
        if not is_machine_id(machine_id):
            raise ValueError(
                f"machine_id={machine_id!r} is not allowed: 1 to 64 of A-Z a-z 0-9 - _"
            )
        self.config = config
        self.machine_id = machine_id
        self._skipper = config.skipper
        self._name = config.cookie_name
        self._name_eq = config.cookie_name + "="
        self._pin_here = self._name_eq + machine_id
        self._pin_length = len(self._pin_here)
        self._replay_field = config.replay_mode + "="
        scope = f"; Path={config.path}"
        if config.domain is not None:
            scope += f"; Domain={config.domain}"
        if config.http_only:
            scope += "; HttpOnly"
        scope += f"; SameSite={config.same_site}"
        lifetime = "" if config.max_age_seconds is None else f"; Max-Age={config.max_age_seconds}"
        stamp = f"{config.cookie_name}={machine_id}{lifetime}{scope}"
        # Expiring our cookie, then setting it again, gives it a new creation time: browsers
        # then list it after an older stray of the same name and path, so that the last
        # value, the pin, is ours again (RFC 6265 5.4: equal paths, older first).
        expire = f"{config.cookie_name}=; Max-Age=0{scope}"
        self._expire_before: dict[str | None, str] = {
            stamp: expire,
            stamp + "; Secure": expire + "; Secure",
        }
        #: The one Decision every request pinned here gets: shared, never changed.
        self.pinned = Decision(Outcome.PINNED, machine_id, machine_id)
        self._skipped = Decision(Outcome.SKIPPED, machine_id)
        self._stamped_plain = Decision(Outcome.STAMPED, machine_id, None, stamp)
        self._stamped_secure = Decision(Outcome.STAMPED, machine_id, None, stamp + "; Secure")
        # A websocket handshake is answered by the server's upgrade machinery, not by a
        # response flysticky can add to; the page that opened it sets the pin.
        self._stamped_websocket = Decision(Outcome.STAMPED, machine_id)
        self._replays: dict[tuple[str, bool], Decision] = {}
        self._reads: dict[str, tuple[str | None, bool]] = {}
        #: The machines that own keys; discovery (flysticky.discovery) keeps it current.
        self.owners = Owners(machine_id)
        self._key = config.key
        self._session_header = config.session_header
        #: Served and replayed decisions per (owner, routed_by, key, cacheable): a room's
        #: users share one, as cookie sessions share ``pinned``. Keys are attacker-chosen,
        #: so the table is bounded.
        self._routed: dict[tuple[str, str, str | None, bool], Decision] = {}
        self.decide: Callable[[Any, str | None, HeaderLookup, bool], Decision] = (
            self._decide_routed
            if config.key is not None or config.session_header is not None
            else self._decide_by_cookie
        )
        # The surest sign of ``pinned``, for an adapter that holds the raw Cookie header
        # (ASGI): the header is exactly our cookie naming this machine, or ends with it
        # after "; ". ``decide`` gives ``pinned`` for both (its own fast path, a superset),
        # so the adapter may skip it, and the building of its header lookup. None when
        # every request must reach ``decide``: a skipper, a key or a session header.
        plain = self.decide == self._decide_by_cookie and config.skipper is None
        self.pinned_cookie: bytes | None = self._pin_here.encode() if plain else None
        self.pinned_cookie_ending: bytes | None = b"; " + self._pin_here.encode() if plain else None
        #: The same, for an adapter that holds the Cookie header as text (Sanic).
        self.pinned_cookie_text: str | None = self._pin_here if plain else None
        self.pinned_cookie_text_ending: str | None = "; " + self._pin_here if plain else None
        #: Where decisions are counted (metrics on), or None. An adapter that gives
        #: ``pinned`` without ``decide`` counts it: ``Tally.count_pinned``.
        self.tally = tally
        if tally is not None:
            self.decide = self._counting(self.decide, tally)

    def surely_pinned(self, cookie_header: str | None) -> bool:
        """Whether the Cookie header surely pins the request here (``pinned_cookie_text``):
        then ``pinned`` is the decision, for an adapter that skips ``decide`` (and counts
        it with ``Tally.count_pinned``)."""
        ending = self.pinned_cookie_text_ending
        return (
            ending is not None
            and cookie_header is not None
            and (cookie_header.endswith(ending) or cookie_header == self.pinned_cookie_text)
        )

    def _counting(
        self, decide: Callable[[Any, str | None, HeaderLookup, bool], Decision], tally: Tally
    ) -> Callable[[Any, str | None, HeaderLookup, bool], Decision]:
        """``decide``, counting what it decides: with metrics off, nothing of this runs."""
        pinned = self.pinned

        def counted(
            request: Any,
            cookie_header: str | None,
            headers: HeaderLookup,
            is_websocket: bool = False,
        ) -> Decision:
            decision = decide(request, cookie_header, headers, is_websocket)
            if decision is pinned:
                tally.pinned += 1
            else:
                tally.count(decision)
            status = headers.get(CACHE_STATUS_HEADER)
            if status is not None:
                tally.arrived(status)
            return decision

        return counted

    def read_pin(self, cookie_header: str) -> str | None:
        """The machine the Cookie header pins this request to, or None.

        The pin is the last value of our cookie that is a valid machine id. Browsers
        list cookies of longer paths first and, for equal paths, older ones first, so a
        stray duplicate (an old cookie for a parent domain, or for a deeper path)
        usually comes before the one flysticky set; and every machine reads the same
        header the same way, so a browser holding two values still sticks to one.
        """
        return self._read(cookie_header)[0]

    def _read(self, cookie_header: str) -> tuple[str | None, bool]:
        """The pin, and whether our cookie arrived with values that differ: then a proxy
        keying its replay cache on the cookie might take another value than the pin."""
        if self._name not in cookie_header:
            return None, False
        values = cookie_values(cookie_header, self._name)
        valid = [v for v in values if is_machine_id(v)]
        if not valid:
            return None, False
        return valid[-1], len({_loosely(v) for v in values}) > 1

    def _remembered_read(self, cookie_header: str) -> tuple[str | None, bool]:
        reads = self._reads
        try:
            return reads[cookie_header]
        except KeyError:
            pass
        read = self._read(cookie_header)
        if len(cookie_header) <= _PIN_CACHE_HEADER:
            if len(reads) >= _PIN_CACHE_SIZE:
                reads.clear()
            reads[cookie_header] = read
        return read

    def _stamped(self, headers: HeaderLookup, is_websocket: bool) -> Decision:
        """The stamp for this request: Secure behind https (or as configured)."""
        if is_websocket:
            return self._stamped_websocket
        secure = self.config.secure
        if secure is None:
            secure = _is_https(headers)
        return self._stamped_secure if secure else self._stamped_plain

    def _replay(self, pin: str, ambiguous: bool) -> Decision:
        key = (pin, ambiguous)
        decision = self._replays.get(key)
        if decision is None:
            if len(self._replays) >= _REPLAY_CACHE_SIZE:
                self._replays.clear()
            replay = self._replay_field + pin
            if ambiguous:
                # Fly's replay cache keys on the cookie's value, and nothing says which
                # of two duplicates it would take: a cached "A" answer for a request
                # that also carried "B" could send every session of machine B to A.
                # Fly does not cache a replay that carries `state`.
                replay += ";" + AMBIGUOUS_REPLAY_STATE
            decision = Decision(Outcome.REPLAYED, self.machine_id, pin, replay=replay)
            self._replays[key] = decision
        return decision

    def _decide_routed(
        self,
        request: Any,
        cookie_header: str | None,
        headers: HeaderLookup,
        is_websocket: bool = False,
    ) -> Decision:
        """``decide`` when the config routes by key or session id; the visitor cookie
        decides the requests that carry neither."""
        key_function = self._key
        if key_function is not None:
            key = key_function(request)
            if key is not None:
                if self._skipped_by(request):
                    return self._skipped
                if not isinstance(key, str):
                    _refuse_key(key_function, key)
                owner = self.owners.owner(key)
                return self._owned(owner, headers, False, "key", key, is_websocket)
        name = self._session_header
        if name is not None:
            session = headers.get(name)
            if session:
                if self._skipped_by(request):
                    return self._skipped
                machine = session_machine(session.strip(" \t"))
                members = self.owners.members
                if machine is not None and members is not None and machine not in members:
                    machine = None  # names no machine of this app any more: served here
                # Our cookie on the same request: a cookie-keyed replay cache could file
                # this machine under the visitor's pin.
                cacheable = not cookie_header or self._name not in cookie_header
                return self._owned(machine, headers, cacheable, name, None, is_websocket)
        return self._decide_by_cookie(request, cookie_header, headers, is_websocket)

    def _skipped_by(self, request: Any) -> bool:
        skipper = self._skipper
        if skipper is None:
            return False
        skip = skipper(request)
        if skip and skip is not True and (isawaitable(skip) or isasyncgen(skip)):
            _refuse_awaitable(skipper, skip)
        return bool(skip)

    def _owned(
        self,
        owner: str | None,
        headers: HeaderLookup,
        cacheable: bool,
        routed_by: str,
        key: str | None,
        is_websocket: bool,
    ) -> Decision:
        """The decision for a request whose machine is ``owner`` (a key's or a session
        id's), by the cookie path's rules: served there, replayed there once, never
        replayed twice, never replayed with a body Fly cannot replay."""
        machine_id = self.machine_id
        if owner is None:
            return Decision(Outcome.UNOWNED, machine_id, routed_by=routed_by, key=key)
        if owner == machine_id:
            return self._routed.get((owner, routed_by, key, True)) or self._remember(
                Decision(Outcome.PINNED, machine_id, owner, routed_by=routed_by, key=key), True
            )
        for name in ROUTED_ARRIVAL_HEADERS:
            if name in headers:
                # The machines disagree on the owner for a moment (one just joined or
                # left), or the owner is gone: serve, never bounce the request back.
                log.info(
                    "unowned: %s %r owned by %s arrived here (%s) by %s; served here",
                    routed_by,
                    key if key is not None else "session",
                    owner,
                    machine_id,
                    name,
                )
                return Decision(
                    Outcome.UNOWNED,
                    machine_id,
                    owner,
                    arrived_by=name,
                    routed_by=routed_by,
                    key=key,
                )
        if not is_websocket and not _body_replayable(headers):
            log.debug("off_pin: body too big or of unknown length to replay to %s", owner)
            return Decision(
                Outcome.OFF_PIN,
                machine_id,
                owner,
                arrived_by=_forwarded_by(headers),
                routed_by=routed_by,
                key=key,
            )
        log.debug("replayed: %s owned by %s", routed_by, owner)
        decision = self._routed.get((owner, routed_by, key, cacheable))
        if decision is None:
            replay = self._replay_field + owner
            if not cacheable:
                replay += ";" + KEY_REPLAY_STATE
            decision = self._remember(
                Decision(
                    Outcome.REPLAYED, machine_id, owner, replay=replay, routed_by=routed_by, key=key
                ),
                cacheable,
            )
        return decision

    def _remember(self, decision: Decision, cacheable: bool) -> Decision:
        key = decision.key
        if key is not None and len(key) > _ROUTED_CACHE_KEY:
            return decision
        routed = self._routed
        if len(routed) >= _ROUTED_CACHE_SIZE:
            routed.clear()
        assert decision.pinned_to is not None and decision.routed_by is not None
        routed[decision.pinned_to, decision.routed_by, key, cacheable] = decision
        return decision

    def _decide_by_cookie(
        self,
        request: Any,
        cookie_header: str | None,
        headers: HeaderLookup,
        is_websocket: bool = False,
    ) -> Decision:
        """``decide`` by the visitor cookie alone. ``request`` is only handed to the
        skipper."""
        skipper = self._skipper
        if skipper is not None:
            skip = skipper(request)
            if skip:
                if skip is not True and (isawaitable(skip) or isasyncgen(skip)):
                    _refuse_awaitable(skipper, skip)
                return self._skipped
        if not cookie_header:
            log.debug("stamped: no %s cookie, pinned to %s", self._name, self.machine_id)
            return self._stamped(headers, is_websocket)
        # The common case, inline: the last "<name>=<this machine>" in the header is a
        # whole cookie, and our name does not occur after it. Anything less plain
        # takes the full reading, which agrees with this on every header this accepts
        # (tests/test_core.py checks it). Not logged: it would flood DEBUG.
        i = cookie_header.rfind(self._pin_here)
        if i >= 0:
            end = i + self._pin_length
            if (
                end == len(cookie_header)
                or (cookie_header[end] == ";" and cookie_header.find(self._name, end) < 0)
            ) and (
                i == 0
                or cookie_header[i - 1] == ";"
                # "; " before it (at i == 1 this reads the last character: at worst a
                # miss, and the full reading decides)
                or (cookie_header[i - 1] == " " and cookie_header[i - 2] == ";")
            ):
                return self.pinned
        pin, ambiguous = self._remembered_read(cookie_header)
        if pin is None:
            log.debug("stamped: no valid %s cookie, pinned to %s", self._name, self.machine_id)
            return self._stamped(headers, is_websocket)
        if pin == self.machine_id:
            # A request is never replayed to the machine that received it.
            return self.pinned
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
                stamp = self._stamped(headers, is_websocket).set_cookie
                return Decision(
                    Outcome.REPINNED,
                    self.machine_id,
                    pin,
                    stamp,
                    arrived_by=name,
                    expire_cookie=self._expire_before.get(stamp) if ambiguous else None,
                )
        if not is_websocket and not _body_replayable(headers):
            log.debug("off_pin: body too big or of unknown length to replay to %s", pin)
            return Decision(
                Outcome.OFF_PIN, self.machine_id, pin, arrived_by=_forwarded_by(headers)
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("replayed: session pinned to %s%s", pin, " (duplicate cookie)" * ambiguous)
        return self._replay(pin, ambiguous)


def _forwarded_by(headers: HeaderLookup) -> str | None:
    """FORWARDED_HEADER when a body too big to replay was forwarded here already: it is
    served, never forwarded again."""
    return FORWARDED_HEADER if FORWARDED_HEADER in headers else None


def _refuse_key(function: object, key: object) -> NoReturn:
    raise TypeError(
        f"StickyConfig.key={function!r} returned {key!r}: it must return a str (the key) "
        "or None (the visitor cookie decides)"
    )


def _refuse_awaitable(skipper: object, result: Any) -> NoReturn:
    if hasattr(result, "close") and not isasyncgen(result):
        result.close()  # no "coroutine was never awaited" warning on top of this error
    raise TypeError(
        f"StickyConfig.skipper={skipper!r} returned an awaitable ({type(result).__name__}): "
        "the skipper must be a plain function returning a bool (it runs on every request, "
        "before any await)"
    )
