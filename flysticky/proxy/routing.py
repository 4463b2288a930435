"""Fly's routing rules as pure functions: request facts and fleet state in, a decision out.

No sockets, no aiohttp, no clock: each rule of ``shared/fly-platform.md`` is a few lines
here and a test in ``tests/test_routing.py``. The transport (``emulator.py``) gathers the
facts, calls these functions and carries out what they decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .cache import CacheRule, ReplayCache
from .replay import Replay, ReplayError, parse_ttl, region_matches

State = Literal["starting", "started", "stopping", "stopped", "suspended", "crashed", "destroyed"]
#: States a machine leaves when a request is aimed at it: "If the machine is not running,
#: the proxy will start it" (stopped, or crashed: a machine whose process exited is a
#: stopped machine to Fly); a suspended one is resumed. starting/stopping: wait for it.
WAKEABLE: frozenset[State] = frozenset({"starting", "stopping", "stopped", "suspended", "crashed"})
#: Replays one request may go through before the proxy gives up (a loop); Fly's docs give
#: no figure, the emulator chooses 10.
MAX_REPLAYS = 10
# Headers only the proxy may set: a client cannot forge its way past a replay.
PROXY_ONLY = frozenset(
    {
        "fly-client-ip",
        "fly-forwarded-port",
        "fly-region",
        "fly-request-id",
        "fly-replay-src",
        "fly-replay-failed",
        "fly-preferred-instance-unavailable",
        "fly-replay-cache-status",
        "x-forwarded-ssl",
        "x-forwarded-port",
        "x-forwarded-proto",
        "via",
    }
)
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MachineFacts:
    id: str
    region: str
    state: State


@dataclass(frozen=True)
class FleetFacts:
    machines: tuple[MachineFacts, ...]
    app_name: str
    edge_region: str  # where clients connect: plain traffic goes to its machines first
    primary_region: str  # where min_machines_running applies
    auto_start: bool = True  # fly.toml's auto_start_machines

    def get(self, machine_id: str) -> MachineFacts | None:
        """The machine with that id, unless it is destroyed (then it is gone for good)."""
        for machine in self.machines:
            if machine.id == machine_id and machine.state != "destroyed":
                return machine
        return None


@dataclass(frozen=True)
class RequestFacts:
    host: str  # without the port
    path: str  # without the query: what replay-cache prefixes match
    target: str  # path and query, as the client sent it
    headers: Mapping[str, str]  # the client's, case-insensitive
    body_replayable: bool = True  # the whole body is held and is at most 1 MiB
    turn: int = 0  # round-robin position
    unavailable: frozenset[str] = frozenset()  # machines that failed to start or connect


@dataclass(frozen=True)
class CacheUpdate:
    """What a decision changes in the replay cache; ``apply`` is the only write."""

    remember_session: tuple[CacheRule, str, str] | None = None  # rule, key, machine
    forget_session: tuple[CacheRule, str] | None = None
    remember_path: tuple[str, str, int] | None = None  # pattern, machine, ttl
    forget_paths: tuple[str, ...] = ()

    def apply(self, cache: ReplayCache) -> None:
        if self.forget_session is not None:
            cache.forget_session(*self.forget_session)
        if self.remember_session is not None:
            cache.remember_session(*self.remember_session)
        for pattern in self.forget_paths:
            cache.forget_path(pattern)
        if self.remember_path is not None:
            cache.remember_path(*self.remember_path)


@dataclass(frozen=True)
class Deliver:
    """Hand the request to ``machine``: the edge headers, changed as said, to ``target``."""

    machine: str
    target: str
    wake: bool = False  # start or resume it first
    set_headers: Headers = ()
    delete_headers: tuple[str, ...] = ()
    timeout: float | None = None  # seconds, from the replay's timeout=
    replay: Replay | None = None  # the replay that led here
    origin: str | None = None  # the machine that issued it
    fallback: bool = False
    cache_hit: bool = False
    path_cache: str | None = None  # the path-cache pattern that routed it here
    cache: CacheUpdate = field(default_factory=CacheUpdate)


@dataclass(frozen=True)
class Refuse:
    """The proxy answers by itself, with ``x-fly-emulator-error: code``."""

    status: int
    code: str
    message: str


Decision = Deliver | Refuse


def edge_headers(
    client: Sequence[tuple[str, str]],
    *,
    client_ip: str,
    proto: str,
    port: int,
    edge_region: str,
    request_id: str,
    http_version: str,
) -> Headers:
    """The request headers as the edge proxy passes them on: its own added, forgeries gone."""
    kept = [(k, v) for k, v in client if k.lower() not in PROXY_ONLY]
    forwarded = next((v for k, v in kept if k.lower() == "x-forwarded-for"), None)
    kept = [(k, v) for k, v in kept if k.lower() != "x-forwarded-for"]
    return (
        *kept,
        ("X-Forwarded-For", f"{forwarded}, {client_ip}" if forwarded else client_ip),
        ("Fly-Client-IP", client_ip),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Port", str(port)),
        ("X-Forwarded-SSL", "on" if proto == "https" else "off"),
        ("Fly-Forwarded-Port", str(port)),
        ("Fly-Region", edge_region),
        ("Fly-Request-Id", f"{request_id}-{edge_region}"),
        ("Via", f"{http_version} fly.io"),
    )


# ---------------------------------------------------------------------- machines
def _reachable(machine: MachineFacts | None, fleet: FleetFacts, request: RequestFacts) -> bool:
    """A request aimed at this machine can be delivered (after starting it if need be)."""
    if machine is None or machine.id in request.unavailable:
        return False
    return machine.state == "started" or (fleet.auto_start and machine.state in WAKEABLE)


def balance(
    fleet: FleetFacts,
    request: RequestFacts,
    *,
    exclude: frozenset[str] = frozenset(),
    regions: tuple[str, ...] = (),
) -> tuple[MachineFacts, bool] | None:
    """Round robin: (machine, must wake it), or None when no machine can take it.

    Started machines first, those of the wanted regions in order (the edge region when
    none is named); with none running, autostart wakes one ("autostart starts one when
    all running machines are over soft_limit": with no load modelled, when none runs).
    """
    usable = [
        m
        for m in fleet.machines
        if m.id not in exclude and m.id not in request.unavailable and m.state != "destroyed"
    ]
    groups: list[list[MachineFacts]]
    if regions:
        groups = [[m for m in usable if region_matches(r, m.region)] for r in regions]
    else:
        groups = [[m for m in usable if m.region == fleet.edge_region], usable]
    for wake in (False, True):
        if wake and not fleet.auto_start:
            break
        for group in groups:
            wanted = WAKEABLE if wake else frozenset({"started"})
            candidates = [m for m in group if m.state in wanted]
            if candidates:
                return candidates[request.turn % len(candidates)], wake
    return None


def _balanced(
    fleet: FleetFacts,
    request: RequestFacts,
    regions: tuple[str, ...] = (),
    set_headers: Headers = (),
    cache: CacheUpdate | None = None,
) -> Deliver | None:
    chosen = balance(fleet, request, regions=regions)
    if chosen is None:
        return None
    return Deliver(
        chosen[0].id,
        request.target,
        wake=chosen[1],
        set_headers=set_headers,
        cache=cache or CacheUpdate(),
    )


# ---------------------------------------------------------------------- first delivery
def route_request(request: RequestFacts, fleet: FleetFacts, cache: ReplayCache) -> Decision:
    """Where a client's request goes first (fly-platform.md: client-side routing headers,
    replay caching, then load balancing)."""
    headers = request.headers
    target = request.target
    forced = headers.get("fly-force-instance-id")
    if forced:
        machine = fleet.get(forced)
        if machine is None or not _reachable(machine, fleet, request):
            return Refuse(503, "forced_instance_unavailable", f"machine {forced} cannot be reached")
        return Deliver(machine.id, target, wake=machine.state != "started")
    unavailable: Headers = ()
    preferred = headers.get("fly-prefer-instance-id")
    if preferred:
        machine = fleet.get(preferred)
        if machine is not None and _reachable(machine, fleet, request):
            return Deliver(machine.id, target, wake=machine.state != "started")
        unavailable = (("fly-preferred-instance-unavailable", preferred),)
    forced_region = (headers.get("fly-force-region") or "").strip().lower()
    if forced_region:
        chosen = _balanced(fleet, request, (forced_region,), unavailable)
        return chosen or Refuse(
            503, "no_machines_in_region", f"no machine in region {forced_region!r} can take it"
        )
    preferred_region = (headers.get("fly-prefer-region") or "").strip().lower()
    if preferred_region:
        chosen = _balanced(fleet, request, (preferred_region,), unavailable)
        if chosen is not None:
            return chosen
    hit = _cached(request, fleet, cache, unavailable)
    if hit is not None:
        return hit
    chosen = _balanced(fleet, request, set_headers=unavailable)
    return chosen or Refuse(503, "no_machines", "no machine of the app can take the request")


def _cached(
    request: RequestFacts, fleet: FleetFacts, cache: ReplayCache, extra: Headers
) -> Deliver | None:
    hit_headers = (*extra, ("fly-replay-cache-status", "hit"))
    path_hit = cache.lookup_path(request.host, request.path)
    forget_paths: tuple[str, ...] = ()
    if path_hit is not None:
        pattern, path_target = path_hit
        machine = fleet.get(path_target)
        if machine is not None and _reachable(machine, fleet, request):
            return Deliver(
                machine.id,
                request.target,
                wake=machine.state != "started",
                set_headers=hit_headers,
                cache_hit=True,
                path_cache=pattern,
            )
        forget_paths = (pattern,)
    rule = cache.rule_for(request.host, request.path)
    key = rule.key(request.headers) if rule is not None else None
    if rule is None or not key:
        return _forgetting(request, fleet, CacheUpdate(forget_paths=forget_paths), extra)
    machine_id = None if _bypassed(rule, request) else cache.lookup_session(rule, key)
    if machine_id is None:
        return _forgetting(request, fleet, CacheUpdate(forget_paths=forget_paths), extra)
    machine = fleet.get(machine_id)
    if machine is not None and _reachable(machine, fleet, request):
        return Deliver(
            machine.id,
            request.target,
            wake=machine.state != "started",
            set_headers=hit_headers,
            cache_hit=True,
            cache=CacheUpdate(forget_paths=forget_paths),
        )
    update = CacheUpdate(forget_session=(rule, key), forget_paths=forget_paths)
    return _forgetting(request, fleet, update, extra)


def _bypassed(rule: CacheRule, request: RequestFacts) -> bool:
    return (
        rule.allow_bypass
        and request.headers.get("fly-replay-cache-control", "").strip().lower() == "skip"
    )


def _forgetting(
    request: RequestFacts, fleet: FleetFacts, update: CacheUpdate, extra: Headers
) -> Deliver | None:
    """Load balance, dropping cache entries that named a machine that cannot be reached."""
    if update == CacheUpdate():
        return None
    return _balanced(fleet, request, set_headers=extra, cache=update)


# ---------------------------------------------------------------------- replays
def route_replay(
    request: RequestFacts,
    fleet: FleetFacts,
    cache: ReplayCache,
    previous: Deliver,
    replay: Replay,
    answer_headers: Mapping[str, str],
    hops: int,
    now_us: int,
) -> Decision:
    """Where a ``fly-replay`` answer from ``previous.machine`` sends the original request."""
    origin = fleet.get(previous.machine)
    origin_region = origin.region if origin is not None else fleet.edge_region
    if previous.fallback:
        return Refuse(502, "fallback_replayed", "a fallback request cannot issue fly-replay")
    if not request.body_replayable:
        return Refuse(
            502, "body_too_large", "the request body is over 1 MiB and cannot be replayed"
        )
    if hops > MAX_REPLAYS:
        return Refuse(502, "replay_loop", f"more than {MAX_REPLAYS} replays: a replay loop")
    try:
        path_update = _path_cache_update(replay, answer_headers, previous)
    except ReplayError as error:
        return Refuse(502, "invalid_replay", str(error))
    chosen, unavailable = _replay_target(replay, previous.machine, request, fleet)
    if chosen is None:
        return fallback(request, fleet, replay, previous.machine, "no_candidate", 0)
    machine, wake = chosen
    src = f"instance={previous.machine};region={origin_region};t={now_us}"
    if replay.state is not None:
        src += f";state={replay.state}"
    added: list[tuple[str, str]] = [*replay.transform.set_headers, ("fly-replay-src", src)]
    if unavailable is not None:
        added.append(("fly-preferred-instance-unavailable", unavailable))
    rule = cache.rule_for(request.host, request.path)
    session = None
    if rule is not None:
        # The cache was not asked (the client's fly-replay-cache-control: skip, where the
        # rule allows it) or had no entry.
        added.append(("fly-replay-cache-status", "bypass" if _bypassed(rule, request) else "miss"))
        key = rule.key(request.headers)
        if key and replay.cacheable:
            session = (rule, key, machine.id)
    pattern = path_update.remember_path
    return Deliver(
        machine=machine.id,
        wake=wake,
        target=replay.transform.path or previous.target,
        set_headers=tuple(added),
        delete_headers=replay.transform.delete_headers,
        timeout=replay.timeout,
        replay=replay,
        origin=previous.machine,
        cache=replace(
            path_update,
            remember_session=session,
            remember_path=(pattern[0], machine.id, pattern[2]) if pattern else None,
        ),
    )


def _replay_target(
    replay: Replay, origin: str, request: RequestFacts, fleet: FleetFacts
) -> tuple[tuple[MachineFacts, bool] | None, str | None]:
    """(machine, must wake it) or None, and the preferred id that could not be honoured."""
    if replay.app is not None and replay.app != fleet.app_name:
        return None, None  # other apps do not exist here
    exclude = frozenset({origin}) if replay.elsewhere else frozenset()
    wanted = replay.instance or replay.prefer_instance
    if wanted is not None:
        machine = fleet.get(wanted)
        if (
            machine is not None
            and machine.id not in exclude
            and _reachable(machine, fleet, request)
        ):
            return (machine, machine.state != "started"), None
        if replay.instance is not None:
            return None, None
    chosen = balance(fleet, request, exclude=exclude, regions=replay.regions)
    return chosen, replay.prefer_instance


def _path_cache_update(
    replay: Replay, answer_headers: Mapping[str, str], previous: Deliver
) -> CacheUpdate:
    """Path-cache entries set or dropped by the replay (the machine is filled in later)."""
    pattern = replay.cache.pattern or answer_headers.get("fly-replay-cache")
    if replay.cache.invalidate or pattern == "invalidate":
        stale = tuple(p for p in (previous.path_cache, replay.cache.pattern) if p)
        return CacheUpdate(forget_paths=stale)
    if not pattern:
        return CacheUpdate()
    header_ttl = answer_headers.get("fly-replay-cache-ttl-secs")
    ttl = replay.cache.ttl or (parse_ttl(header_ttl) if header_ttl is not None else 60)
    return CacheUpdate(remember_path=(pattern, "", ttl))


def fallback(
    request: RequestFacts,
    fleet: FleetFacts,
    replay: Replay,
    origin: str,
    reason: Literal["timeout", "retries_exhausted", "no_candidate"],
    elapsed_ms: int,
) -> Decision:
    """A replay that could not be delivered: back to its origin with fly-replay-failed when
    it asked for a fallback; otherwise an error (504 for a timeout)."""
    if replay.fallback is None:
        status = 504 if reason == "timeout" else 502
        return Refuse(status, reason, f"fly-replay could not be delivered ({reason})")
    machine = fleet.get(origin)
    chosen: tuple[MachineFacts, bool] | None = None
    if machine is not None and _reachable(machine, fleet, request):
        chosen = (machine, machine.state != "started")
    elif replay.fallback == "prefer_self":
        chosen = balance(fleet, request)
    if chosen is None:
        return Refuse(502, "fallback_failed", "no machine can take the fallback request")
    failed = (
        f"instance={replay.instance or replay.prefer_instance or ''};"
        f"app={replay.app or fleet.app_name};region={','.join(replay.regions)};"
        f"replay_source={origin};reason={reason};elapsed_ms={elapsed_ms}"
    )
    return Deliver(
        machine=chosen[0].id,
        wake=chosen[1],
        target=request.target,
        set_headers=(("fly-replay-failed", failed),),
        fallback=True,
    )


def after_failure(
    request: RequestFacts,
    fleet: FleetFacts,
    failed: Deliver,
    reason: Literal["timeout", "retries_exhausted"],
    elapsed_ms: int,
) -> Decision:
    """The machine took the request (bytes were sent) and then failed or timed out.

    The request is never sent anywhere else but through a replay's own fallback: the
    machine may have acted on it (a POST charged twice is worse than an error).
    """
    if failed.replay is not None and failed.origin is not None:
        return fallback(request, fleet, failed.replay, failed.origin, reason, elapsed_ms)
    if reason == "timeout":
        return Refuse(504, "timeout", f"machine {failed.machine} did not answer in time")
    return Refuse(
        502,
        "machine_failed",
        f"machine {failed.machine} failed while handling the request; "
        "it is not re-sent elsewhere, as the machine may have acted on it",
    )


# ---------------------------------------------------------------------- autostop
def machines_to_stop(
    fleet: FleetFacts, idle: Mapping[str, float], idle_after: float, min_running: int
) -> list[str]:
    """The machines autostop stops (or suspends) in one round.

    Fly: per region, one machine per round while excess capacity (machines - (machines
    over soft_limit + 1)) is positive, or the region's only machine when it has no
    traffic; never below ``min_machines_running`` in the primary region (the first
    region of the fleet). The emulator models no load, so it picks only machines with
    nothing in flight for ``idle_after`` seconds (``idle``: seconds idle per machine,
    busy ones absent), the longest idle first.
    """
    primary = fleet.primary_region
    chosen = []
    for region in dict.fromkeys(m.region for m in fleet.machines):
        started = [m for m in fleet.machines if m.region == region and m.state == "started"]
        if region == primary and len(started) <= min_running:
            continue
        candidates = [m for m in started if idle.get(m.id, -1.0) >= idle_after]
        if candidates:
            chosen.append(max(candidates, key=lambda m: idle[m.id]).id)
    return chosen
