"""The app through Sanic's ASGI test client."""

import asyncio
import json
from typing import Any, Self

import pytest
from sanic_testing.testing import SanicASGITestClient

from app import app
from tests.conftest import BAD_ROOMS, MACHINE, OTHER

COOKIE = {{ cookiecutter.cookie_name | tojson }}


@pytest.fixture
def client() -> SanicASGITestClient:
    return SanicASGITestClient(app)


async def test_health_is_not_sticky(client: SanicASGITestClient) -> None:
    _, response = await client.get("/health", cookies={COOKIE: OTHER})
    assert response.status_code == 200
    assert response.text == "ok"
    assert COOKIE not in response.cookies


async def test_first_visit_pins_and_counts(client: SanicASGITestClient) -> None:
    _, first = await client.get("/api/visit")
    assert first.status_code == 200
    assert first.cookies[COOKIE] == MACHINE
    assert first.json["visits"] == 1
    assert first.json["outcome"] == "stamped"
    cookies = {COOKIE: MACHINE, "demo-session": first.cookies["demo-session"]}
    _, second = await client.get("/api/visit", cookies=cookies)
    assert second.json["visits"] == 2
    assert second.json["outcome"] == "pinned"


async def test_page_shows_the_machine(client: SanicASGITestClient) -> None:
    _, response = await client.get("/")
    assert response.status_code == 200
    assert MACHINE in response.text
    assert "Visits this session" in response.text
    assert 'pattern="[a-z0-9\\-]{1,32}"' in response.text


async def test_other_machine_is_replayed(client: SanicASGITestClient) -> None:
    _, response = await client.get("/", cookies={COOKIE: OTHER})
    assert response.status_code == 307
    assert response.headers["fly-replay"] == f"prefer_instance={OTHER}"


async def test_upload(client: SanicASGITestClient) -> None:
    _, response = await client.post("/api/upload", content=b"x" * 1000, cookies={COOKIE: MACHINE})
    assert response.json == {"machine": MACHINE, "bytes": 1000}


async def test_room_is_routed_by_its_name(client: SanicASGITestClient) -> None:
    # The cookie names another machine, but the room decides; its owner is unknown here
    # (no FLY_APP_NAME, so no machines to ask about): served here.
    _, response = await client.get("/rooms/lobby", cookies={COOKIE: OTHER})
    assert response.status_code == 200
    assert response.json["room"] == "lobby" and response.json["machine"] == MACHINE
    assert response.json["outcome"] == "unowned" and response.json["owner"] is None


@pytest.mark.parametrize("name", BAD_ROOMS)
async def test_bad_room_names_are_refused(client: SanicASGITestClient, name: str) -> None:
    _, response = await client.get(f"/rooms/{name}")
    assert response.status_code == 400
    assert "lowercase letters" in response.json["error"]
    assert name not in response.text


class AsgiSocket:
    """A websocket to the app through its ASGI interface, driven as an ASGI server drives
    one: sanic-testing's client closes its websockets at once. (Under ASGI, Sanic's
    websocket close() does nothing: on Sanic's own server it closes; the template's own
    tests check that.)"""

    def __init__(self, path: str) -> None:
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "subprotocols": [],
        }
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        await self.to_app.put({"type": "websocket.connect"})
        self.task = asyncio.create_task(app(self.scope, self.to_app.get, self.from_app.put))
        accept = await asyncio.wait_for(self.from_app.get(), 5)
        assert accept["type"] == "websocket.accept", accept
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, 5)

    async def send(self, text: str) -> None:
        await self.to_app.put({"type": "websocket.receive", "text": text})

    async def receive(self) -> dict[str, Any]:
        message = await asyncio.wait_for(self.from_app.get(), 5)
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])  # type: ignore[no-any-return]


async def test_room_messages_reach_every_socket_in_the_room(
    client: SanicASGITestClient,
) -> None:
    await client.get("/health")  # the app started, as a server would start it
    async with AsgiSocket("/rooms/team/ws") as first, AsgiSocket("/rooms/team/ws") as second:
        hello = await first.receive()
        assert hello["type"] == "joined" and hello["room"] == "team"
        assert hello["machine"] == MACHINE and hello["outcome"] == "unowned"
        assert (await second.receive())["type"] == "joined"
        await first.send("<b>hi</b>")
        for socket in (first, second):
            message = await socket.receive()
            assert message["text"] == "<b>hi</b>" and message["from"] == hello["you"]
        await second.send("x" * 501)
        assert "at most 500" in (await second.receive())["error"]
    async with AsgiSocket("/rooms/team/ws") as later:
        assert [m["text"] for m in (await later.receive())["messages"]] == ["<b>hi</b>"]
    async with AsgiSocket("/rooms/other/ws") as elsewhere:
        assert (await elsewhere.receive())["messages"] == []


async def test_bad_room_websocket_is_refused(client: SanicASGITestClient) -> None:
    await client.get("/health")
    async with AsgiSocket("/rooms/No_Such/ws") as socket:
        assert "lowercase letters" in (await socket.receive())["error"]
        await asyncio.wait_for(socket.task, 5)  # the handler is done with it
