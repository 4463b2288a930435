"""The pure decision core, hammered directly: rules, edges and properties."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flysticky import Decider, Decision, Outcome, StickyConfig, is_machine_id
from flysticky.core import (
    HeaderTable,
    apply_stamp,
    machine_id_from_env,
    private_cache_control,
)

from .harness import MACHINE, OTHER

decider = Decider(StickyConfig(), MACHINE)
strict = Decider(StickyConfig(replay_mode="instance"), MACHINE)
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
HEADER_SAFE = re.compile(r"[\x20-\x7e]*")


def decide(cookie: str | None, is_websocket: bool = False, **headers: str) -> Decision:
    lookup = {k.replace("_", "-"): v for k, v in headers.items()}
    return decider.decide(None, cookie, lookup, is_websocket)


def test_the_algorithm() -> None:
    assert decide(None).outcome is Outcome.STAMPED
    assert decide(f"fly-machine-id={MACHINE}").outcome is Outcome.PINNED
    replay = decide(f"fly-machine-id={OTHER}")
    assert (replay.outcome, replay.replay, replay.serve) == (
        Outcome.REPLAYED,
        f"prefer_instance={OTHER}",
        False,
    )
    assert strict.decide(None, f"fly-machine-id={OTHER}", {}).replay == f"instance={OTHER}"


def test_pinned_decision_is_shared_and_carries_nothing_to_send() -> None:
    first = decide(f"fly-machine-id={MACHINE}")
    assert first is decide(f"a=1; fly-machine-id={MACHINE}")
    assert (first.set_cookie, first.replay, first.serve) == (None, None, True)


@pytest.mark.parametrize(
    "cookie",
    [
        f"fly-machine-id= {MACHINE}",
        f"fly-machine-id={MACHINE} ",
        f'fly-machine-id="{MACHINE}"',
        f'a=1;  fly-machine-id="{MACHINE}" ',
        f"old-fly-machine-id={MACHINE}; fly-machine-id={MACHINE}",
        f"fly-machine-id={MACHINE}!; fly-machine-id={MACHINE}",
        f"fly-machine-id={MACHINE}X; fly-machine-id={MACHINE}",
        f"a=1;\tfly-machine-id={MACHINE}",
        f"x=fly-machine-id={MACHINE}; fly-machine-id={MACHINE}",
        f"fly-machine-id={MACHINE}; fly-machine-id={MACHINE}",
    ],
)
def test_a_request_is_never_replayed_to_the_machine_that_received_it(cookie: str) -> None:
    decision = decide(cookie)
    assert (decision.outcome, decision.replay, decision.set_cookie) == (Outcome.PINNED, None, None)


@pytest.mark.parametrize(
    ("cookie", "pin"),
    [
        (f"fly-machine-id={MACHINE}", MACHINE),
        (f"fly-machine-id=bad!; fly-machine-id={OTHER}", OTHER),
        (f"fly-machine-id={OTHER}; fly-machine-id=bad!", OTHER),
        (f"xfly-machine-id={OTHER}", None),
        (f"a=b fly-machine-id={OTHER}", None),
        (f"fly-machine-id ={OTHER}", OTHER),
        (f"\tfly-machine-id\t= {OTHER}", OTHER),
        (f"fly-machine-id={OTHER}; fly-machine-id={MACHINE}", MACHINE),
        (f"fly-machine-id={MACHINE}; fly-machine-id={OTHER}", OTHER),
    ],
)
def test_the_pin_is_the_last_valid_value(cookie: str, pin: str | None) -> None:
    assert decider.read_pin(cookie) == pin


def test_the_fast_path_agrees_with_the_full_reading() -> None:
    fresh = Decider(StickyConfig(), MACHINE)
    shapes = ["", " ", ";", "; ", ";  ", "a=1", "a=1; ", "a=1;", "x", "fly-machine-id=", '"']
    values = [MACHINE, OTHER, f"{MACHINE}!", f" {MACHINE}", f'"{MACHINE}"', ""]
    for before in shapes:
        for value in values:
            for after in shapes:
                for extra in (
                    "",
                    f"; fly-machine-id={OTHER}",
                    f"; fly-machine-id={MACHINE}",
                    f"; fly-machine-id ={OTHER}",
                    "; fly-machine-id",
                ):
                    header = f"{before}fly-machine-id={value}{after}{extra}"
                    expected = fresh.read_pin(header) == MACHINE
                    assert (fresh.decide(None, header, {}).outcome is Outcome.PINNED) is expected
                    raw = header.encode()
                    assert fresh.pinned_cookie_ending and fresh.pinned_cookie
                    if raw.endswith(fresh.pinned_cookie_ending) or raw == fresh.pinned_cookie:
                        assert expected  # the adapters' shortcut never says more than decide
                    if fresh.surely_pinned(header):
                        assert expected  # nor does its text form (Sanic's, Quart's)


@settings(max_examples=2000)
@given(prefix=st.text(max_size=120))
def test_a_header_ending_with_our_pin_is_pinned_whatever_comes_before(prefix: str) -> None:
    fresh = Decider(StickyConfig(), MACHINE)
    header = f"{prefix}; fly-machine-id={MACHINE}"
    assert fresh.pinned_cookie_ending is not None
    assert header.encode().endswith(fresh.pinned_cookie_ending)
    assert fresh.surely_pinned(header)
    assert fresh.decide(None, header, {}).outcome is Outcome.PINNED


def test_no_shortcut_where_every_request_must_reach_decide() -> None:
    for config in (
        StickyConfig(skipper=lambda request: False),
        StickyConfig(key=lambda request: None),
        StickyConfig(session_header="mcp-session-id"),
    ):
        fresh = Decider(config, MACHINE)
        assert (fresh.pinned_cookie, fresh.pinned_cookie_ending) == (None, None)
        assert not fresh.surely_pinned(f"fly-machine-id={MACHINE}")


def test_duplicate_values_replay_in_a_form_fly_does_not_cache() -> None:
    third = "0123456789abcd"
    header = f"fly-machine-id={third}; fly-machine-id={OTHER}"
    decision = decide(header)
    assert decision.outcome is Outcome.REPLAYED
    assert decision.replay == f"prefer_instance={OTHER};state=flysticky-duplicate-cookie"
    # The same value twice is no ambiguity: the cacheable form.
    assert decide(f"fly-machine-id={OTHER}; fly-machine-id={OTHER}").replay == (
        f"prefer_instance={OTHER}"
    )
    # Every machine reads the header alike: the session sticks to the last value's machine.
    assert Decider(StickyConfig(), OTHER).decide(None, header, {}).outcome is Outcome.PINNED
    assert Decider(StickyConfig(), third).decide(None, header, {}).replay == decision.replay


@pytest.mark.parametrize(
    "header",
    [
        f"fly-machine-id=0123456789abcd; fly-machine-id = {OTHER}",
        f"fly-machine-id=0123456789abcd; fly-machine-id\t={OTHER}",
        f'fly-machine-id=0123456789abcd; fly-machine-id = "{OTHER}"',
        f"fly-machine-id={OTHER}; fly-machine-id=0123456789abcd\v",
        f"fly-machine-id={OTHER}; fly-machine-id=",
        f"fly-machine-id={OTHER}; fly-machine-id=not valid",
    ],
)
def test_any_second_value_however_spaced_makes_the_replay_uncacheable(header: str) -> None:
    # A proxy may trim names and values more than flysticky does, and key its replay
    # cache on the other value: never answer such a request with a cacheable replay.
    decision = decide(header)
    assert decision.outcome is Outcome.REPLAYED
    assert decision.replay is not None and decision.replay.endswith(
        ";state=flysticky-duplicate-cookie"
    )


def test_the_same_value_however_written_is_no_ambiguity() -> None:
    header = f'fly-machine-id={OTHER}; fly-machine-id = "{OTHER}"'
    assert decide(header).replay == f"prefer_instance={OTHER}"


def test_a_repin_with_a_stray_duplicate_sets_the_cookie_anew() -> None:
    gone = "0123456789abcd"
    header = f"fly-machine-id={OTHER}; fly-machine-id={gone}"
    decision = decide(header, fly_preferred_instance_unavailable=gone)
    assert decision.outcome is Outcome.REPINNED
    assert decision.expire_cookie == ("fly-machine-id=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax")
    sent: list[tuple[str, str]] = []

    class Headers(dict[str, str]):
        def add(self, key: str, value: str) -> None:
            sent.append((key, value))

    apply_stamp(decision, Headers())
    assert [v for _, v in sent] == [decision.expire_cookie, decision.set_cookie]
    secure = decide(header, fly_preferred_instance_unavailable=gone, x_forwarded_proto="https")
    assert secure.expire_cookie is not None and secure.expire_cookie.endswith("; Secure")
    # A single value is re-pinned in place: nothing to reorder.
    assert decide(f"fly-machine-id={gone}", fly_replay_src="x").expire_cookie is None


@pytest.mark.parametrize(
    "hostile",
    [
        "a fly-machine-id=" * 60_000,
        "fly-machine-id=" * 60_000,
        f"fly-machine-id={MACHINE}X" * 60_000,
        ";" * 1_000_000,
        " " * 1_000_000 + f"fly-machine-id={OTHER}",
        "fly-machine-id=" + "a" * 1_000_000,
    ],
)
def test_a_decision_is_linear_in_the_header(hostile: str) -> None:
    plain = "; ".join(f"c{i}=" + "v" * 40 for i in range(len(hostile) // 45))[: len(hostile)]

    def cost(header: str) -> float:
        best = float("inf")
        for _ in range(3):
            fresh = Decider(StickyConfig(), MACHINE)
            start = time.perf_counter()
            fresh.decide(None, header, {})
            best = min(best, time.perf_counter() - start)
        return best

    # A plain header of the same size is the yardstick; quadratic work on 1 MB is
    # hundreds of times slower, linear work a small factor at most.
    assert cost(hostile) < 20 * cost(plain) + 0.005


@pytest.mark.parametrize(
    ("length", "outcome"),
    [
        ("9" * 5000, Outcome.OFF_PIN),
        ("0" * 5000 + "12", Outcome.REPLAYED),
        ("", Outcome.OFF_PIN),
        ("  ", Outcome.OFF_PIN),
        ("0001048577", Outcome.OFF_PIN),
        ("+5", Outcome.OFF_PIN),
        ("1_000", Outcome.OFF_PIN),
    ],
)
def test_any_content_length_is_a_number_or_not(length: str, outcome: Outcome) -> None:
    assert decide(f"fly-machine-id={OTHER}", content_length=length).outcome is outcome


def test_a_skipper_that_returns_an_awaitable_is_an_error_naming_it() -> None:
    async def check(request: object) -> bool:
        return True

    def sneaky(request: object) -> Any:
        return check(request)

    async def generator(request: object) -> Any:
        yield True

    def sneakier(request: object) -> Any:
        return generator(request)

    for skipper in (sneaky, sneakier):
        sneaky_decider = Decider(StickyConfig(skipper=skipper), MACHINE)
        with pytest.raises(TypeError, match=r"skipper=<function .*sneak.* returned an awaitable"):
            sneaky_decider.decide(None, None, {})
    skipping = Decider(StickyConfig(skipper=lambda r: True), MACHINE)
    assert skipping.decide(None, None, {}).outcome is Outcome.SKIPPED


def test_a_malformed_machine_id_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    value = f"bad id {time.time_ns()}"
    for _ in range(3):
        assert machine_id_from_env({"FLY_MACHINE_ID": value}.get) is None
    assert [r.levelname for r in caplog.records if value in r.getMessage()] == ["WARNING"]


def test_websocket_is_never_stamped_but_is_replayed() -> None:
    assert decide(None, True).set_cookie is None
    assert decide(f"fly-machine-id={OTHER}", True).replay == f"prefer_instance={OTHER}"


@pytest.mark.parametrize(
    ("headers", "outcome"),
    [
        ({"content_length": "1048576"}, Outcome.REPLAYED),
        ({"content_length": " 1048576 "}, Outcome.REPLAYED),
        ({"content_length": "1048577"}, Outcome.OFF_PIN),
        ({"content_length": "99999999999999999999999"}, Outcome.OFF_PIN),
        ({"content_length": "-1"}, Outcome.OFF_PIN),
        ({"content_length": "12abc"}, Outcome.OFF_PIN),
        ({"content_length": "\u0661\u0662"}, Outcome.OFF_PIN),  # Arabic-Indic digits
        ({"transfer_encoding": "chunked"}, Outcome.OFF_PIN),
        ({}, Outcome.REPLAYED),
    ],
)
def test_body_limits(headers: dict[str, str], outcome: Outcome) -> None:
    assert decide(f"fly-machine-id={OTHER}", **headers).outcome is outcome


def test_remembered_pins_are_bounded() -> None:
    fresh = Decider(StickyConfig(), MACHINE)
    for n in range(10_000):
        assert fresh.decide(None, f"fly-machine-id=m{n}", {}).pinned_to == f"m{n}"
    assert 0 < len(fresh._reads) <= 4096
    assert len(fresh._replays) <= 1024
    long = "x=" + "y" * 2000 + f"; fly-machine-id={OTHER}"
    assert fresh.decide(None, long, {}).replay == f"prefer_instance={OTHER}"
    assert long not in fresh._reads  # long headers are not kept


def test_header_table_reads_first_values_case_insensitively_once() -> None:
    pairs = iter([("Cookie", "a=1"), ("FLY-REPLAY-SRC", "x"), ("cookie", "b=2")])
    table = HeaderTable(pairs)
    assert table.get("cookie") == "a=1"
    assert "fly-replay-src" in table
    assert table.get("missing") is None


def test_machine_id_from_env() -> None:
    assert machine_id_from_env({"FLY_MACHINE_ID": MACHINE}.get) == MACHINE
    assert machine_id_from_env({}.get) is None
    assert machine_id_from_env({"FLY_MACHINE_ID": ""}.get) is None
    assert machine_id_from_env({"FLY_MACHINE_ID": "a;app=x"}.get) is None


def test_decider_refuses_a_bad_machine_id() -> None:
    with pytest.raises(ValueError, match="machine_id='a b'"):
        Decider(StickyConfig(), "a b")


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, "private"),
        ("", "private"),
        ("public, max-age=60", "private, max-age=60"),
        ("max-age=60, s-maxage=600", "private, max-age=60"),
        ("no-store", "no-store"),
        ("private, max-age=5", "private, max-age=5"),
    ],
)
def test_private_cache_control(existing: str | None, expected: str) -> None:
    assert private_cache_control(existing) == expected


cookie_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200
)


@settings(max_examples=2000)
@given(value=cookie_text, prefix=cookie_text)
def test_no_byte_outside_the_grammar_reaches_a_header(value: str, prefix: str) -> None:
    for header in (f"fly-machine-id={value}", f"{prefix}; fly-machine-id={value}", value):
        decision = decide(header)
        if header is not value and "fly-machine-id=" not in prefix:
            clean = value.split(";")[0].strip(" \t")
            if not is_machine_id(clean) and not is_machine_id(clean[1:-1]):
                assert decision.outcome is Outcome.STAMPED
        assert decision.pinned_to is None or ID.fullmatch(decision.pinned_to)
        if decision.replay is not None:
            assert re.fullmatch(r"prefer_instance=[A-Za-z0-9_-]{1,64}", decision.replay)
        if decision.set_cookie is not None:
            assert decision.set_cookie.startswith(f"fly-machine-id={MACHINE};")
            assert HEADER_SAFE.fullmatch(decision.set_cookie)


@given(st.from_regex(ID, fullmatch=True))
def test_every_valid_id_round_trips(machine: str) -> None:
    decision = decide(f"fly-machine-id={machine}")
    if machine == MACHINE:
        assert decision.outcome is Outcome.PINNED
    else:
        assert decision.replay == f"prefer_instance={machine}"
