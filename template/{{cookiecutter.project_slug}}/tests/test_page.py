"""The rooms, apart from the web framework: names, bounds, and moving to a new owner."""

import asyncio
import json
from types import SimpleNamespace

import pytest

import page
from tests.conftest import MACHINE, OTHER


@pytest.mark.parametrize(
    ("path", "room"),
    [
        ("/rooms/lobby", "lobby"),
        ("/rooms/lobby/ws", "lobby"),
        ("/rooms/a-1/", "a-1"),
        ("/rooms/" + "a" * 32, "a" * 32),
        ("/rooms/" + "a" * 33, None),
        ("/rooms/Lobby", None),
        ("/rooms/lobby\n", None),
        ("/rooms/lob by", None),
        ("/rooms/", None),
        ("/rooms//ws", None),
        ("/roomsx/lobby", None),
        ("/api/rooms/lobby", None),
        ("/", None),
        ("", None),
        ("/rooms/caf\u00e9", None),
        ("/rooms/\udcff", None),
        ("/rooms/" + "a" * 100_000, None),
    ],
)
def test_room_key_reads_the_room_from_the_path(path: str, room: str | None) -> None:
    assert page.room_key(SimpleNamespace(path=path)) == room


def test_room_key_never_raises() -> None:
    class NotUtf8:
        @property
        def path(self) -> str:
            return b"/rooms/\xff".decode("utf-8")  # what Sanic does with such a path

    assert page.room_key(NotUtf8()) is None
    assert page.room_key(SimpleNamespace(path=None)) is None


async def test_a_full_room_refuses_more_sockets() -> None:
    rooms = page.Rooms()
    for _ in range(page.ROOM_SOCKETS):
        rooms.join("lobby")
    with pytest.raises(page.RoomRefused, match="full"):
        rooms.join("lobby")


async def test_rooms_are_bounded_and_empty_ones_go_first() -> None:
    rooms = page.Rooms()
    members = {f"r{n}": rooms.join(f"r{n}") for n in range(page.MAX_ROOMS)}
    rooms.leave("r5", members["r5"])
    rooms.join("new")  # r5 is empty: forgotten to make room
    assert "r5" not in rooms.names() and "new" in rooms.names()
    with pytest.raises(page.RoomRefused, match="too many rooms"):
        rooms.join("one-more")


async def test_messages_reach_the_room_only_and_are_bounded() -> None:
    rooms = page.Rooms()
    first, second, elsewhere = rooms.join("a"), rooms.join("a"), rooms.join("b")
    rooms.say("a", first, "  hello  ")
    for member in (first, second):
        message = json.loads(await asyncio.wait_for(member.next(), 1))
        assert message["text"] == "hello" and message["from"] == first.name
    rooms.say("a", first, "x" * (page.MESSAGE_LIMIT + 1))
    assert "at most" in json.loads(await asyncio.wait_for(first.next(), 1))["error"]
    rooms.say("a", first, b"binary")
    assert "text" in json.loads(await asyncio.wait_for(first.next(), 1))["error"]
    for n in range(page.HISTORY + 5):
        rooms.say("a", first, f"m{n}")
    assert len(rooms.history("a")) == page.HISTORY
    assert rooms.history("b") == [] and elsewhere.close_code is None


async def test_a_socket_too_slow_for_its_room_is_closed() -> None:
    rooms = page.Rooms()
    talker, reader = rooms.join("a"), rooms.join("a")
    for n in range(page.OUTBOX + 1):
        rooms.say("a", talker, f"m{n}")
        await asyncio.wait_for(talker.next(), 1)  # the talker keeps up; the reader does not
    assert reader.close_code == page.TOO_SLOW
    assert await reader.next() is None


async def test_rooms_owned_elsewhere_move_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(page, "REBALANCE_SECONDS", 0.01)
    owners = {"mine": MACHINE, "moved": OTHER, "unknown": None}
    rooms = page.Rooms()
    members = {name: rooms.join(name) for name in owners}
    rooms.start_rebalancing(owners.get)
    try:
        await asyncio.wait_for(members["moved"].next(), 1)
    finally:
        await rooms.stop_rebalancing()
    assert members["moved"].close_code == page.MOVED  # the page reconnects, to the owner
    assert sorted(rooms.names()) == ["mine", "unknown"]
    assert members["mine"].close_code is None and members["unknown"].close_code is None
    # The page that joined before this machine knew it owned the room is told.
    told = json.loads(await asyncio.wait_for(members["mine"].next(), 1))
    assert told == {"type": "owner", "owner": MACHINE}
