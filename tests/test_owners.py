"""Affinity by key in the core: rendezvous owners, session ids that name their machine,
and the Decider's rules for requests routed by either."""

from __future__ import annotations

import enum
import random
from types import SimpleNamespace
from typing import Any

import pytest

from flysticky import (
    REPLAY_BODY_LIMIT,
    Decider,
    Outcome,
    StickyConfig,
    new_session_id,
    session_machine,
)
from flysticky.core import ROUTED_ARRIVAL_HEADERS, HeaderTable
from flysticky.owners import Owners

HERE = "90801679a10038"
OTHER = "148ed193b04d89"
THIRD = "e2865013b05e86"


def machine_ids(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(56):014x}" for _ in range(count)]


def owners_of(members: list[str], keys: list[str]) -> dict[str, str | None]:
    owners = Owners(members[0])
    owners.update(members)
    return {key: owners.owner(key) for key in keys}


KEYS = [f"room-{n}" for n in range(20_000)]


def test_no_owner_until_the_machines_are_known() -> None:
    owners = Owners(HERE)
    assert owners.members is None
    assert owners.owner("room-1") is None
    assert owners.update([OTHER]) is True
    assert owners.members == tuple(sorted([HERE, OTHER]))  # this machine is always one
    assert owners.update(None) is True
    assert owners.owner("room-1") is None


def test_every_machine_computes_the_same_owner() -> None:
    members = [HERE, OTHER, THIRD]
    here, other = Owners(HERE), Owners(OTHER)
    here.update(members)
    other.update(reversed(members))
    assert all(here.owner(k) == other.owner(k) for k in KEYS[:2000])


@pytest.mark.parametrize("count", [3, 10, 50])
def test_keys_spread_evenly(count: int) -> None:
    members = machine_ids(count)
    won: dict[str | None, int] = {}
    for owner in owners_of(members, KEYS).values():
        won[owner] = won.get(owner, 0) + 1
    assert set(won) == set(members)
    share = len(KEYS) / count
    assert all(0.75 * share < n < 1.25 * share for n in won.values()), won


@pytest.mark.parametrize("count", [3, 10, 50])
def test_a_joining_machine_takes_about_one_in_n_plus_one_keys_and_only_those_move(
    count: int,
) -> None:
    members = machine_ids(count + 1)
    before = owners_of(members[:count], KEYS)
    after = owners_of(members, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == members[count] for k in moved), "a key moved between old machines"
    expected = len(KEYS) / (count + 1)
    assert 0.8 * expected < len(moved) < 1.2 * expected


def test_a_leaving_machine_gives_up_only_its_own_keys() -> None:
    members = machine_ids(5)
    before = owners_of(members, KEYS)
    after = owners_of(members[:2] + members[3:], KEYS)
    assert all(after[k] == before[k] for k in KEYS if before[k] != members[2])


def test_hostile_members_and_keys() -> None:
    owners = Owners(HERE)
    owners.update([OTHER, "", "bad id", "x" * 65, "a;b", "\x00"])
    assert owners.members == tuple(sorted([HERE, OTHER]))
    for key in ["", "\x00", "é" * 10_000, "\ud800", "a" * 1_000_000]:
        assert owners.owner(key) in (HERE, OTHER)


def test_the_owner_table_is_bounded() -> None:
    owners = Owners(HERE)
    owners.update([OTHER, THIRD])
    for n in range(10_000):
        owners.owner(f"k{n}")
    assert len(owners._cache) <= 4096


def test_session_ids_name_their_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    made = new_session_id(HERE)
    assert session_machine(made) == HERE
    assert made != new_session_id(HERE)
    assert len(made.partition(".")[2]) >= 24  # unguessable part
    monkeypatch.setenv("FLY_MACHINE_ID", OTHER)
    assert session_machine(new_session_id()) == OTHER
    monkeypatch.delenv("FLY_MACHINE_ID")
    assert session_machine(new_session_id()) is None  # off Fly it names no machine
    with pytest.raises(ValueError, match="machine_id='bad id'"):
        new_session_id("bad id")


@pytest.mark.parametrize(
    "value",
    ["", ".", f"{HERE}.", f".{HERE}", "no-dot", f"{HERE};app=x.y", "a b.c", "\u0430bc.x"],
)
def test_values_that_name_no_machine(value: str) -> None:
    assert session_machine(value) is None


# ------------------------------------------------------------------ the Decider


def room_of(request: Any) -> str | None:
    path: str = request.path
    return path.removeprefix("/rooms/") if path.startswith("/rooms/") else None


def decider(members: list[str] | None = None, **options: Any) -> Decider:
    config = StickyConfig(key=room_of, session_header="mcp-session-id", **options)
    made = Decider(config, HERE)
    made.owners.update(members)
    return made


def key_owned_by(machine: str, members: list[str]) -> str:
    owners = Owners(HERE)
    owners.update(members)
    return next(k for k in (f"r{n}" for n in range(1000)) if owners.owner(k) == machine)


def decide(made: Decider, path: str, headers: dict[str, str] | None = None) -> Any:
    headers = headers or {}
    return made.decide(
        SimpleNamespace(path=path),
        headers.get("cookie"),
        HeaderTable(headers.items()),
        False,
    )


MEMBERS = [HERE, OTHER, THIRD]


def test_a_key_owned_here_is_served_here() -> None:
    room = key_owned_by(HERE, MEMBERS)
    decision = decide(decider(MEMBERS), f"/rooms/{room}", {"cookie": f"fly-machine-id={OTHER}"})
    assert decision.outcome is Outcome.PINNED
    assert (decision.key, decision.routed_by, decision.pinned_to) == (room, "key", HERE)
    assert decision.set_cookie is None  # the visitor's own pin is not touched


def test_a_key_owned_elsewhere_is_replayed_there_uncached() -> None:
    room = key_owned_by(OTHER, MEMBERS)
    decision = decide(decider(MEMBERS), f"/rooms/{room}", {"cookie": f"fly-machine-id={HERE}"})
    assert decision.outcome is Outcome.REPLAYED
    # Fly's replay cache keys on one value per client; a client visits many rooms.
    assert decision.replay == f"prefer_instance={OTHER};state=flysticky-key"
    strict = decide(decider(MEMBERS, replay_mode="instance"), f"/rooms/{room}")
    assert strict.replay == f"instance={OTHER};state=flysticky-key"


@pytest.mark.parametrize("arrival", ROUTED_ARRIVAL_HEADERS)
def test_a_key_request_that_arrived_by_replay_is_served_not_bounced(arrival: str) -> None:
    # Two machines that disagree for a moment on the owners: the second one serves.
    room = key_owned_by(OTHER, MEMBERS)
    decision = decide(decider(MEMBERS), f"/rooms/{room}", {arrival: "x"})
    assert decision.outcome is Outcome.UNOWNED
    assert decision.replay is None
    assert (decision.arrived_by, decision.pinned_to) == (arrival, OTHER)


def test_a_replay_cache_hit_on_a_key_request_is_replayed_to_the_owner() -> None:
    # The visitor cookie's cache entry at "/" sent a room request to the visitor's machine;
    # the room's owner is elsewhere. Key replays are never cached, so the hit is the
    # cookie's: replay it once (the owner then sees fly-replay-src and serves).
    room = key_owned_by(OTHER, MEMBERS)
    hit = {"fly-replay-cache-status": "hit", "cookie": f"fly-machine-id={HERE}"}
    decision = decide(decider(MEMBERS), f"/rooms/{room}", hit)
    assert decision.replay == f"prefer_instance={OTHER};state=flysticky-key"
    # The cookie path still takes a hit as an arrival.
    cookie_hit = {"fly-replay-cache-status": "hit", "cookie": f"fly-machine-id={OTHER}"}
    assert decide(decider(MEMBERS), "/", cookie_hit).outcome is Outcome.REPINNED


def test_a_key_request_with_a_body_fly_cannot_replay_goes_off_pin() -> None:
    room = key_owned_by(OTHER, MEMBERS)
    big = {"content-length": str(REPLAY_BODY_LIMIT + 1)}
    decision = decide(decider(MEMBERS), f"/rooms/{room}", big)
    assert (decision.outcome, decision.pinned_to, decision.replay) == (Outcome.OFF_PIN, OTHER, None)


def test_keys_are_served_here_while_the_machines_are_unknown() -> None:
    decision = decide(decider(None), "/rooms/lobby")
    assert decision.outcome is Outcome.UNOWNED
    assert decision.pinned_to is None and decision.replay is None


def test_no_key_falls_back_to_the_visitor_cookie() -> None:
    made = decider(MEMBERS)
    assert decide(made, "/", {"cookie": f"fly-machine-id={HERE}"}) is made.pinned
    assert decide(made, "/").outcome is Outcome.STAMPED
    replayed = decide(made, "/", {"cookie": f"fly-machine-id={OTHER}"})
    assert replayed.replay == f"prefer_instance={OTHER}"  # the cookie path, cacheable


def test_the_skipper_wins_over_the_key_and_runs_once() -> None:
    calls: list[str] = []

    def skipper(request: Any) -> bool:
        calls.append(request.path)
        return request.path.endswith("/health")

    made = decider(MEMBERS, skipper=skipper)
    assert decide(made, "/rooms/x/health").outcome is Outcome.SKIPPED
    decide(made, "/rooms/y")
    decide(made, "/")
    assert calls == ["/rooms/x/health", "/rooms/y", "/"]


def test_a_key_function_returning_a_non_string_is_a_clear_error() -> None:
    made = Decider(StickyConfig(key=lambda request: 42), HERE)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"StickyConfig.key=.* returned 42: it must return a str"):
        decide(made, "/")


def test_an_async_key_function_is_refused_at_construction() -> None:
    async def key(request: Any) -> str:
        return "x"

    with pytest.raises(ValueError, match=r"StickyConfig.key=.*plain \(not async\)"):
        StickyConfig(key=key)  # type: ignore[arg-type]


def test_a_session_id_goes_to_the_machine_it_names() -> None:
    made = decider(MEMBERS)
    session = new_session_id(OTHER)
    decision = decide(made, "/mcp", {"mcp-session-id": session})
    assert decision.outcome is Outcome.REPLAYED
    assert decision.routed_by == "mcp-session-id"
    # No cookie of ours: a replay cache keyed on the session header may keep it.
    assert decision.replay == f"prefer_instance={OTHER}"
    with_cookie = decide(
        made, "/mcp", {"mcp-session-id": session, "cookie": f"fly-machine-id={HERE}"}
    )
    assert with_cookie.replay == f"prefer_instance={OTHER};state=flysticky-key"
    mine = decide(made, "/mcp", {"mcp-session-id": new_session_id(HERE)})
    assert (mine.outcome, mine.pinned_to) == (Outcome.PINNED, HERE)


def test_a_session_id_naming_no_live_machine_is_served_here() -> None:
    made = decider(MEMBERS)
    gone = decide(made, "/mcp", {"mcp-session-id": new_session_id("0123456789abcd")})
    assert (gone.outcome, gone.replay) == (Outcome.UNOWNED, None)
    # Before discovery has answered, the id is trusted: prefer_instance heals if it is gone.
    early = decide(decider(None), "/mcp", {"mcp-session-id": new_session_id(OTHER)})
    assert early.replay == f"prefer_instance={OTHER}"


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        f"{OTHER}",
        f"{OTHER};app=evil.x",
        f"{OTHER}\r\nset-cookie: a=b.x",
        "x" * 100_000,
        f"evil machine.{OTHER}",
    ],
)
def test_hostile_session_ids_never_reach_a_header(value: str) -> None:
    decision = decide(decider(MEMBERS), "/mcp", {"mcp-session-id": value})
    assert decision.replay is None
    assert decision.outcome is Outcome.UNOWNED


def test_config_checks_the_new_fields() -> None:
    with pytest.raises(ValueError, match="session_header='bad header'"):
        StickyConfig(session_header="bad header")
    assert StickyConfig(session_header="Mcp-Session-Id").session_header == "mcp-session-id"
    with pytest.raises(ValueError, match="owners='some'"):
        StickyConfig(owners="some")  # type: ignore[arg-type]
    for bad in (0, -1, True, "5", 1e9):
        with pytest.raises(ValueError, match="refresh_seconds"):
            StickyConfig(refresh_seconds=bad)  # type: ignore[arg-type]
    for port in (0, 70000, "8080", True):
        with pytest.raises(ValueError, match="forward_port"):
            StickyConfig(forward_port=port)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key='room'"):
        StickyConfig(key="room")  # type: ignore[arg-type]


def test_two_machines_that_disagree_on_the_owners_never_bounce_a_request() -> None:
    # Rendezvous scores are the same everywhere, so A cannot think B owns a key while B
    # thinks A does; but A, not yet seeing THIRD, can send a key to OTHER, which knows
    # THIRD now owns it. The replayed request is served at OTHER, not sent on.
    here = decider([HERE, OTHER])
    other = Decider(StickyConfig(key=room_of), OTHER)
    other.owners.update([HERE, OTHER, THIRD])
    room = next(
        k
        for k in (f"r{n}" for n in range(10_000))
        if here.owners.owner(k) == OTHER and other.owners.owner(k) == THIRD
    )
    first = decide(here, f"/rooms/{room}")
    assert first.replay == f"prefer_instance={OTHER};state=flysticky-key"
    # Fly's proxy replays it to OTHER with fly-replay-src: OTHER serves it.
    replayed = decide(other, f"/rooms/{room}", {"fly-replay-src": f"instance={HERE};t=1"})
    assert (replayed.outcome, replayed.replay) == (Outcome.UNOWNED, None)
    assert replayed.pinned_to == THIRD
    # Without the arrival header OTHER would have replayed it again.
    assert decide(other, f"/rooms/{room}").replay == f"prefer_instance={THIRD};state=flysticky-key"


def test_routed_decisions_are_shared_and_their_tables_bounded() -> None:
    made = decider(MEMBERS)
    room = key_owned_by(HERE, MEMBERS)
    assert decide(made, f"/rooms/{room}") is decide(made, f"/rooms/{room}")
    for n in range(10_000):
        decide(made, f"/rooms/k{n}")
    assert len(made._routed) <= 4096
    assert len(made.owners._cache) <= 4096
    huge = "x" * 100_000  # scored by its digest, and kept nowhere
    assert decide(made, f"/rooms/{huge}").key == huge
    assert all(len(key or "") <= 256 for _, _, key, _ in made._routed)
    assert all(len(key) <= 256 for key in made.owners._cache)


def test_a_forged_forwarded_header_changes_nothing_on_a_small_request() -> None:
    # Any client can send it; it counts only on a body too big to replay.
    room = key_owned_by(OTHER, MEMBERS)
    forged = {"flysticky-forwarded-from": OTHER, "cookie": f"fly-machine-id={OTHER}"}
    assert decide(decider(MEMBERS), f"/rooms/{room}", forged).outcome is Outcome.REPLAYED
    assert decide(decider(MEMBERS), "/", forged).outcome is Outcome.REPLAYED
    big = {**forged, "content-length": str(REPLAY_BODY_LIMIT + 1)}
    for path in (f"/rooms/{room}", "/"):
        decision = decide(decider(MEMBERS), path, big)
        # Forwarded here already: served here, never forwarded again.
        assert (decision.outcome, decision.arrived_by) == (
            Outcome.OFF_PIN,
            "flysticky-forwarded-from",
        )


def test_a_websocket_handshake_is_never_off_pin_whatever_its_headers_say() -> None:
    room = key_owned_by(OTHER, MEMBERS)
    odd = {"content-length": str(REPLAY_BODY_LIMIT + 1), "cookie": f"fly-machine-id={OTHER}"}
    for path in (f"/rooms/{room}", "/"):
        decision = decider(MEMBERS).decide(
            SimpleNamespace(path=path), odd["cookie"], HeaderTable(odd.items()), True
        )
        assert decision.outcome is Outcome.REPLAYED


def test_key_functions_may_return_str_subclasses_and_the_skipper_comes_first() -> None:
    class Room(enum.StrEnum):
        LOBBY = "lobby"

    made = Decider(StickyConfig(key=lambda request: Room.LOBBY), HERE)
    made.owners.update([HERE])
    assert decide(made, "/x").key == "lobby"
    # A bad key on a path the skipper skips is never looked at.
    skipping = StickyConfig(key=lambda request: 42, skipper=lambda request: True)  # type: ignore[arg-type,return-value]
    assert decide(Decider(skipping, HERE), "/health").outcome is Outcome.SKIPPED


def test_the_skipper_runs_once_on_a_skipped_request_with_a_session_id() -> None:
    calls: list[str] = []

    def skipper(request: Any) -> bool:
        calls.append(request.path)
        return True

    made = decider(MEMBERS, skipper=skipper)
    decision = decide(made, "/health", {"mcp-session-id": new_session_id(OTHER)})
    assert decision.outcome is Outcome.SKIPPED
    assert calls == ["/health"]


@pytest.mark.parametrize(
    "name", ["host", "Cookie", "content-length", "fly-replay-src", "flysticky-forwarded-from"]
)
def test_a_session_header_that_means_something_else_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="session_header"):
        StickyConfig(session_header=name)
