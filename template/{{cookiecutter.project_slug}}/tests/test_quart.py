"""The app through Quart's test client."""

import asyncio
import json

import pytest

from app import app
from tests.conftest import BAD_ROOMS, MACHINE, OTHER

COOKIE = {{ cookiecutter.cookie_name | tojson }}


async def test_health_is_not_sticky() -> None:
    response = await app.test_client().get("/health", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 200
    assert await response.get_data(as_text=True) == "ok"
    assert "set-cookie" not in response.headers


async def test_first_visit_pins_and_counts() -> None:
    client = app.test_client()
    first = await client.get("/api/visit")
    assert first.status_code == 200
    assert (await first.get_json())["visits"] == 1
    assert (await first.get_json())["outcome"] == "stamped"
    cookies = first.headers.get_all("set-cookie")
    assert any(value.startswith(f"{COOKIE}={MACHINE};") for value in cookies)
    second = await client.get("/api/visit")  # the client keeps its cookies
    assert (await second.get_json())["visits"] == 2
    assert (await second.get_json())["outcome"] == "pinned"


async def test_page_shows_the_machine() -> None:
    response = await app.test_client().get("/")
    assert response.status_code == 200
    body = await response.get_data(as_text=True)
    assert MACHINE in body
    assert 'pattern="[a-z0-9\\-]{1,32}"' in body


async def test_other_machine_is_replayed() -> None:
    response = await app.test_client().get("/", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 307
    assert response.headers["fly-replay"] == f"prefer_instance={OTHER}"


async def test_upload() -> None:
    response = await app.test_client().post(
        "/api/upload",
        data=b"x" * 1000,
        headers={"cookie": f"{COOKIE}={MACHINE}", "content-length": "1000"},
    )
    assert await response.get_json() == {"machine": MACHINE, "bytes": 1000}


async def test_websocket_says_its_machine() -> None:
    async with app.test_client().websocket("/ws") as ws:
        assert MACHINE in await ws.receive()
        await ws.send("ping")
        assert "ping" in await ws.receive()


async def test_room_is_routed_by_its_name() -> None:
    # The cookie names another machine, but the room decides; its owner is unknown here
    # (no FLY_APP_NAME, so no machines to ask about): served here.
    response = await app.test_client().get("/rooms/lobby", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 200
    info = await response.get_json()
    assert info["room"] == "lobby" and info["machine"] == MACHINE
    assert info["outcome"] == "unowned" and info["owner"] is None


@pytest.mark.parametrize("name", BAD_ROOMS)
async def test_bad_room_names_are_refused(name: str) -> None:
    response = await app.test_client().get(f"/rooms/{name}")
    assert response.status_code == 400
    assert "lowercase letters" in (await response.get_json())["error"]
    assert name not in await response.get_data(as_text=True)


async def receive(ws: object) -> dict[str, object]:
    return json.loads(await asyncio.wait_for(ws.receive(), 5))  # type: ignore[attr-defined]


async def test_room_messages_reach_every_socket_in_the_room() -> None:
    client = app.test_client()
    async with (
        client.websocket("/rooms/team/ws") as first,
        client.websocket("/rooms/team/ws") as second,
    ):
        hello = await receive(first)
        assert hello["type"] == "joined" and hello["room"] == "team"
        assert hello["machine"] == MACHINE and hello["outcome"] == "unowned"
        assert (await receive(second))["type"] == "joined"
        await first.send("<b>hi</b>")
        for ws in (first, second):
            message = await receive(ws)
            assert message["text"] == "<b>hi</b>" and message["from"] == hello["you"]
        await second.send("x" * 501)
        assert "at most 500" in str((await receive(second))["error"])
    async with client.websocket("/rooms/team/ws") as later:
        messages = (await receive(later))["messages"]
        assert [m["text"] for m in messages] == ["<b>hi</b>"]  # type: ignore[attr-defined]
    async with client.websocket("/rooms/other/ws") as elsewhere:
        assert (await receive(elsewhere))["messages"] == []


async def test_bad_room_websocket_is_refused() -> None:
    # Then the app closes it with 1008, which Quart's test client reports differently
    # from one Quart version to the next (a browser sees the code).
    async with app.test_client().websocket("/rooms/No_Such/ws") as ws:
        assert "lowercase letters" in str((await receive(ws))["error"])
