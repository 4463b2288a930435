"""Fly's routing rules, one by one against shared/fly-platform.md, with no sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from flysticky.proxy.cache import CacheRule, ReplayCache
from flysticky.proxy.replay import Replay, ReplayError, parse_header, parse_json
from flysticky.proxy.routing import (
    MAX_REPLAYS,
    CacheUpdate,
    Deliver,
    FleetFacts,
    MachineFacts,
    Refuse,
    RequestFacts,
    State,
    after_failure,
    balance,
    edge_headers,
    machines_to_stop,
    route_replay,
    route_request,
)

A, B, C, D = "aaaaaaaaaaaaaa", "bbbbbbbbbbbbbb", "cccccccccccccc", "dddddddddddddd"


def fleet(
    *states: tuple[str, str, State], auto_start: bool = True, edge: str = "iad"
) -> FleetFacts:
    return FleetFacts(
        tuple(MachineFacts(i, r, s) for i, r, s in states), "app", edge, "iad", auto_start
    )


THREE = fleet((A, "iad", "started"), (B, "iad", "started"), (C, "ams", "started"))


def request(turn: int = 0, **headers: str) -> RequestFacts:
    return RequestFacts(
        host="example.com",
        path="/p",
        target="/p?q=1",
        headers=CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items()),
        turn=turn,
    )


def cache(*rules: CacheRule) -> ReplayCache:
    return ReplayCache(list(rules), clock=lambda: 1000.0)


def replay_from(previous: str, replay: Replay, facts: FleetFacts = THREE, **kw: object) -> object:
    return route_replay(
        kw.pop("req", request()),  # type: ignore[arg-type]
        facts,
        kw.pop("cache", cache()),  # type: ignore[arg-type]
        Deliver(previous, "/p?q=1", fallback=bool(kw.pop("fallback", False))),
        replay,
        CIMultiDict(kw.pop("answer", {})),  # type: ignore[arg-type]
        int(kw.pop("hops", 1)),  # type: ignore[call-overload]
        1_700_000_000_000_000,
    )


# ---------------------------------------------------------------------- edge headers
def test_edge_headers_added_and_forgeries_stripped() -> None:
    headers = dict(
        edge_headers(
            [("fly-replay-src", "forged"), ("X-Forwarded-For", "10.0.0.1"), ("x-a", "1")],
            client_ip="127.0.0.1",
            proto="https",
            port=8080,
            edge_region="iad",
            request_id="abc",
            http_version="1.1",
        )
    )
    assert "fly-replay-src" not in headers
    assert headers["x-a"] == "1"
    assert headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert headers["X-Forwarded-SSL"] == "on"
    assert headers["Fly-Region"] == "iad"
    assert headers["Fly-Request-Id"] == "abc-iad"
    assert headers["Via"] == "1.1 fly.io"


# ---------------------------------------------------------------------- load balancing
def test_round_robin_over_started_machines_of_the_edge_region() -> None:
    chosen = {route_request(request(turn), THREE, cache()).machine for turn in range(6)}  # type: ignore[union-attr]
    assert chosen == {A, B}  # ams is not the edge region


def test_other_regions_when_the_edge_region_has_none_running() -> None:
    facts = fleet((A, "iad", "destroyed"), (C, "ams", "started"))
    assert route_request(request(), facts, cache()) == Deliver(C, "/p?q=1")


def test_stopped_machines_are_started_only_when_none_runs() -> None:
    facts = fleet((A, "iad", "stopped"), (B, "iad", "started"))
    assert balance(facts, request()) == (facts.machines[1], False)
    facts = fleet((A, "iad", "stopped"), (B, "iad", "suspended"))
    assert balance(facts, request()) == (facts.machines[0], True)
    # auto_start_machines = false: the proxy starts nothing.
    assert balance(fleet((A, "iad", "stopped"), auto_start=False), request()) is None
    refused = route_request(request(), fleet((A, "iad", "stopped"), auto_start=False), cache())
    assert refused == Refuse(503, "no_machines", "no machine of the app can take the request")


# ---------------------------------------------------------------------- client headers
@pytest.mark.parametrize(
    ("state", "wake"),
    [("started", False), ("stopped", True), ("suspended", True), ("crashed", True)],
)
def test_force_instance_starts_or_resumes_its_machine(state: State, wake: bool) -> None:
    facts = fleet((A, "iad", "started"), (B, "iad", state))
    decision = route_request(request(fly_force_instance_id=B), facts, cache())
    assert decision == Deliver(B, "/p?q=1", wake=wake)


def test_force_instance_to_a_destroyed_machine_is_an_error() -> None:
    facts = fleet((A, "iad", "started"), (B, "iad", "destroyed"))
    decision = route_request(request(fly_force_instance_id=B), facts, cache())
    assert isinstance(decision, Refuse) and decision.status == 503


def test_prefer_instance_header_falls_back_with_unavailable() -> None:
    facts = fleet((A, "iad", "started"), (B, "iad", "destroyed"))
    decision = route_request(request(fly_prefer_instance_id=B), facts, cache())
    assert decision == Deliver(
        A, "/p?q=1", set_headers=(("fly-preferred-instance-unavailable", B),)
    )


def test_force_region_and_prefer_region() -> None:
    assert route_request(request(fly_force_region="ams"), THREE, cache()).machine == C  # type: ignore[union-attr]
    refused = route_request(request(fly_force_region="syd"), THREE, cache())
    assert isinstance(refused, Refuse) and refused.code == "no_machines_in_region"
    assert route_request(request(fly_prefer_region="AMS"), THREE, cache()).machine == C  # type: ignore[union-attr]
    # No machine there: prefer falls back to the usual choice.
    assert route_request(request(fly_prefer_region="syd"), THREE, cache()).machine in (A, B)  # type: ignore[union-attr]


# ---------------------------------------------------------------------- replays
def test_instance_replay_with_src_state_and_transform() -> None:
    replay = parse_json(
        b'{"instance": "' + B.encode() + b'", "state": "s", '
        b'"transform": {"path": "/x?y=1", "delete_headers": ["X-Secret"],'
        b' "set_headers": [{"name": "x-added", "value": "1"}]}}'
    )
    decision = replay_from(A, replay)
    assert isinstance(decision, Deliver)
    assert (decision.machine, decision.target, decision.origin) == (B, "/x?y=1", A)
    assert decision.delete_headers == ("x-secret",)
    assert ("fly-replay-src", f"instance={A};region=iad;t=1700000000000000;state=s") in (
        decision.set_headers
    )


@pytest.mark.parametrize("state", ["stopped", "suspended", "crashed", "starting"])
def test_replay_to_a_stopped_or_suspended_machine_wakes_it(state: State) -> None:
    facts = fleet((A, "iad", "started"), (B, "iad", state))
    for field in ("instance", "prefer_instance"):
        decision = replay_from(A, parse_header(f"{field}={B}"), facts)
        assert isinstance(decision, Deliver)
        assert (decision.machine, decision.wake) == (B, True)
        assert not any(k == "fly-preferred-instance-unavailable" for k, _ in decision.set_headers)


def test_prefer_instance_goes_elsewhere_only_when_gone_or_unable_to_start() -> None:
    gone = fleet((A, "iad", "started"), (B, "iad", "destroyed"))
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), gone)
    assert isinstance(decision, Deliver) and decision.machine == A
    assert ("fly-preferred-instance-unavailable", B) in decision.set_headers
    stopped = fleet((A, "iad", "started"), (B, "iad", "stopped"))
    failed_start = RequestFacts("h", "/p", "/p", {}, unavailable=frozenset({B}))
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), stopped, req=failed_start)
    assert isinstance(decision, Deliver) and decision.machine == A
    no_autostart = fleet((A, "iad", "started"), (B, "iad", "stopped"), auto_start=False)
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), no_autostart)
    assert isinstance(decision, Deliver) and decision.machine == A


def test_instance_to_a_destroyed_machine_errors_or_falls_back() -> None:
    gone = fleet((A, "iad", "started"), (B, "iad", "destroyed"))
    decision = replay_from(A, parse_header(f"instance={B}"), gone)
    assert isinstance(decision, Refuse) and (decision.status, decision.code) == (
        502,
        "no_candidate",
    )
    decision = replay_from(A, parse_header(f"instance={B};fallback=force_self"), gone)
    assert isinstance(decision, Deliver) and decision.fallback and decision.machine == A
    failed = dict(decision.set_headers)["fly-replay-failed"]
    assert (
        failed == f"instance={B};app=app;region=;replay_source={A};reason=no_candidate;elapsed_ms=0"
    )


def test_regions_aliases_elsewhere_and_other_apps() -> None:
    decision = replay_from(A, parse_header('region="syd,eu"'))
    assert isinstance(decision, Deliver) and decision.machine == C
    decision = replay_from(A, parse_header("region=us"))
    assert isinstance(decision, Deliver) and decision.machine in (A, B)
    for turn in range(4):
        decision = replay_from(A, parse_header("elsewhere=true"), req=request(turn))
        assert isinstance(decision, Deliver) and decision.machine != A
    decision = replay_from(A, parse_header("app=other"))
    assert isinstance(decision, Refuse) and decision.code == "no_candidate"


def test_limits_body_loop_and_fallback_replay() -> None:
    big = RequestFacts("h", "/p", "/p", {}, body_replayable=False)
    decision = replay_from(A, parse_header(f"instance={B}"), req=big)
    assert isinstance(decision, Refuse) and decision.code == "body_too_large"
    decision = replay_from(A, parse_header(f"instance={B}"), hops=MAX_REPLAYS + 1)
    assert isinstance(decision, Refuse) and decision.code == "replay_loop"
    decision = replay_from(A, parse_header(f"instance={B}"), fallback=True)
    assert isinstance(decision, Refuse) and decision.code == "fallback_replayed"


def test_never_delivered_twice_after_bytes_were_sent() -> None:
    failed = Deliver(A, "/p")
    decision = after_failure(request(), THREE, failed, "retries_exhausted", 5)
    assert isinstance(decision, Refuse) and (decision.status, decision.code) == (
        502,
        "machine_failed",
    )
    replayed = Deliver(B, "/p", replay=parse_header(f"instance={B};fallback=force_self"), origin=A)
    decision = after_failure(request(), THREE, replayed, "timeout", 300)
    assert isinstance(decision, Deliver) and decision.fallback and decision.machine == A
    assert "reason=timeout;elapsed_ms=300" in dict(decision.set_headers)["fly-replay-failed"]


# ---------------------------------------------------------------------- replay cache
def test_session_cache_remembers_plain_replays_and_hits_later() -> None:
    rule = CacheRule("/", 300, "cookie", "fly-machine-id")
    store = cache(rule)
    with_cookie = request(cookie=f"fly-machine-id={B}")
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), req=with_cookie, cache=store)
    assert isinstance(decision, Deliver)
    assert ("fly-replay-cache-status", "miss") in decision.set_headers
    assert decision.cache.remember_session == (rule, B, B)
    decision.cache.apply(store)
    hit = route_request(with_cookie, THREE, store)
    assert isinstance(hit, Deliver) and hit.machine == B and hit.cache_hit
    # state= makes a replay uncacheable (fly-platform.md).
    decision = replay_from(A, parse_header(f"instance={B};state=x"), req=with_cookie, cache=store)
    assert isinstance(decision, Deliver) and decision.cache.remember_session is None


def test_a_bypassed_cache_says_bypass_on_the_replayed_request() -> None:
    rule = CacheRule("/", 300, "cookie", "fly-machine-id", allow_bypass=True)
    store = cache(rule)
    store.remember_session(rule, B, B)
    skip = request(cookie=f"fly-machine-id={B}", fly_replay_cache_control="skip")
    landed = route_request(skip, THREE, store)
    assert isinstance(landed, Deliver) and not landed.cache_hit
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), req=skip, cache=store)
    assert isinstance(decision, Deliver)
    assert ("fly-replay-cache-status", "bypass") in decision.set_headers
    # Without allow_bypass the client's skip is not obeyed: a miss, as any replay.
    strict = CacheRule("/", 300, "cookie", "fly-machine-id")
    decision = replay_from(A, parse_header(f"prefer_instance={B}"), req=skip, cache=cache(strict))
    assert isinstance(decision, Deliver)
    assert ("fly-replay-cache-status", "miss") in decision.set_headers


def test_cache_entry_for_a_destroyed_machine_is_forgotten() -> None:
    rule = CacheRule("/", 300, "cookie", "k")
    store = cache(rule)
    store.remember_session(rule, "v", B)
    facts = fleet((A, "iad", "started"), (B, "iad", "destroyed"))
    decision = route_request(request(cookie="k=v"), facts, store)
    assert isinstance(decision, Deliver) and decision.machine == A
    assert decision.cache == CacheUpdate(forget_session=(rule, "v"))


def test_bad_path_cache_ttl_is_an_invalid_replay_not_a_crash() -> None:
    for ttl in ("x", "-1", "0", "1e9", "99999999999999999999"):
        decision = replay_from(
            A,
            parse_header(f"instance={B}"),
            answer={"fly-replay-cache": "h/p*", "fly-replay-cache-ttl-secs": ttl},
        )
        assert isinstance(decision, Refuse) and decision.code == "invalid_replay", ttl


def test_cache_is_bounded_and_drops_expired_entries() -> None:
    now = [0.0]
    store = ReplayCache([], clock=lambda: now[0], max_entries=100)
    rule = CacheRule("/", 10, "cookie", "k")
    for i in range(1000):
        store.remember_session(rule, str(i), A)
        store.remember_path(f"/p{i}*", A, 10)
    assert len(store) <= 200
    now[0] = 11.0  # all expired
    store.remember_session(rule, "new", A)
    store.remember_path("/new*", A, 10)
    assert len(store) == 2


@pytest.mark.parametrize(
    ("name", "header", "value"),
    [
        ("fly-machine-id", f"$x=1; fly-machine-id={B}", B),  # http.cookies gave up here
        ("$x", "$x=v; k=w", "v"),
        ("fly-machine-id", f"a=1;  fly-machine-id = {B} ;b=2", B),
        ("fly-machine-id", f"a=1;\tfly-machine-id\t=\t{B}", B),
        ("k", 'k="quoted value"', "quoted value"),
        ("k", 'k=""', ""),
        ("k", 'k="x', '"x'),  # not a pair of quotes: kept as sent
        ("k", "k=first; k=second", "first"),  # duplicates: the FIRST, in either order
        ("k", "k=second; k=first", "second"),
        ("k", "kk=1; k; xk=2", None),
        ("k", "", None),
        ("k", "a=1; k=v=w; b=\x00", "v=w"),
    ],
)
def test_cookie_key_is_read_as_a_proxy_reads_it(name: str, header: str, value: str | None) -> None:
    rule = CacheRule("/", 300, "cookie", name)
    assert rule.key(CIMultiDict(cookie=header)) == value


@pytest.mark.parametrize(
    "body",
    [
        b'{"instance": 5}',
        b'{"region": 5}',
        b'{"region": ["iad", 3]}',
        b'{"elsewhere": "yes"}',
        b'{"timeout": 5, "region": "iad"}',
        b'{"region": "iad", "transform": {"path": 5}}',
        b'{"region": "iad", "transform": {"path": "@evil.example/x"}}',
        b'{"region": "iad", "transform": {"path": "//evil.example/x"}}',
        b'{"region": "iad", "transform": {"path": "http://evil.example/"}}',
        b'{"region": "iad", "transform": {"path": "/a b"}}',
        b'{"region": "iad", "transform": {"set_headers": [{"name": 1}]}}',
        b'{"region": "iad", "transform": {"set_headers": [{"name": "x", "value": "a\\r\\nb"}]}}',
        b'{"region": "iad", "transform": {"delete_headers": "x"}}',
        b'{"region": "iad", "cache": {"ttl": "x"}}',
        b'{"region": "iad", "cache": {"invalidate": "yes"}}',
        b'{"region": "iad", "transform": []}',
    ],
)
def test_malformed_json_replays_are_refused(body: bytes) -> None:
    with pytest.raises(ReplayError):
        parse_json(body)


# ---------------------------------------------------------------------- autostop
def test_autostop_one_idle_machine_per_region_per_round_down_to_min() -> None:
    facts = fleet(
        (A, "iad", "started"), (B, "iad", "started"), (C, "ams", "started"), (D, "ams", "stopped")
    )
    idle = {A: 100.0, B: 200.0, C: 100.0, D: 999.0}
    assert machines_to_stop(facts, idle, 30, 0) == [B, C]
    assert machines_to_stop(facts, {A: 5.0, C: 100.0}, 30, 0) == [C]  # A busy or recent
    # min_machines_running counts the primary region (iad) only.
    assert machines_to_stop(facts, idle, 30, 2) == [C]
    assert machines_to_stop(facts, idle, 30, 1) == [B, C]
