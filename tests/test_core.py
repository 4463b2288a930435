"""The pure decision core, hammered directly: rules, edges and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flysticky import Decider, Decision, Outcome, StickyConfig, is_machine_id
from flysticky.core import HeaderTable, machine_id_from_env, private_cache_control

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


def test_a_cookie_naming_this_machine_wins_over_others() -> None:
    both = f"fly-machine-id={OTHER}; fly-machine-id={MACHINE}"
    assert decide(both).outcome is Outcome.PINNED
    assert decide(f"fly-machine-id=bad!; fly-machine-id={OTHER}").pinned_to == OTHER
    assert decider.read_pin(both) == OTHER  # otherwise the first valid value is the pin


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
    assert 0 < len(fresh._pins) <= 4096
    assert len(fresh._replays) <= 1024
    long = "x=" + "y" * 2000 + f"; fly-machine-id={OTHER}"
    assert fresh.decide(None, long, {}).replay == f"prefer_instance={OTHER}"
    assert long not in fresh._pins  # long headers are not kept


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
