"""The app through Starlette's TestClient, lifespan and all, as Uvicorn would serve it."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fastapi.websockets import WebSocketDisconnect
from starlette.testclient import WebSocketDenialResponse

from app import app
from tests.conftest import BAD_ROOMS, MACHINE, OTHER

COOKIE = {{ cookiecutter.cookie_name | tojson }}


@pytest.fixture
def client() -> Iterator[TestClient]:
    # `with`: the lifespan runs, and flysticky starts with it, as it does on Uvicorn.
    with TestClient(app) as client:
        yield client


def test_health_is_not_sticky(client: TestClient) -> None:
    response = client.get("/health", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 200
    assert response.text == "ok"
    assert "set-cookie" not in response.headers


def test_first_visit_pins_and_counts(client: TestClient) -> None:
    first = client.get("/api/visit")
    assert first.status_code == 200
    assert first.json()["visits"] == 1
    assert first.json()["outcome"] == "stamped"
    cookies = first.headers.get_list("set-cookie")
    assert any(value.startswith(f"{COOKIE}={MACHINE};") for value in cookies)
    second = client.get("/api/visit")  # the client keeps its cookies
    assert second.json()["visits"] == 2
    assert second.json()["outcome"] == "pinned"


def test_page_shows_the_machine(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert MACHINE in response.text
    assert "Visits this session" in response.text
    assert 'pattern="[a-z0-9\\-]{1,32}"' in response.text


def test_other_machine_is_replayed(client: TestClient) -> None:
    response = client.get("/", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 307
    assert response.headers["fly-replay"] == f"prefer_instance={OTHER}"


def test_websocket_for_another_machine_is_replayed_before_the_upgrade(
    client: TestClient,
) -> None:
    # Uvicorn offers the ASGI websocket denial response: the handshake gets the replay.
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/ws", headers={"cookie": f"{COOKIE}={OTHER}"}):
            pass
    assert denied.value.status_code == 307
    assert denied.value.headers["fly-replay"] == f"prefer_instance={OTHER}"


def test_upload(client: TestClient) -> None:
    response = client.post(
        "/api/upload", content=b"x" * 1000, headers={"cookie": f"{COOKIE}={MACHINE}"}
    )
    assert response.json() == {"machine": MACHINE, "bytes": 1000}


def test_websocket_says_its_machine(client: TestClient) -> None:
    with client.websocket_connect("/ws") as ws:
        assert MACHINE in ws.receive_text()
        ws.send_text("ping")
        assert "ping" in ws.receive_text()


def test_room_is_routed_by_its_name(client: TestClient) -> None:
    # The cookie names another machine, but the room decides; its owner is unknown here
    # (no FLY_APP_NAME, so no machines to ask about): served here.
    response = client.get("/rooms/lobby", headers={"cookie": f"{COOKIE}={OTHER}"})
    assert response.status_code == 200
    info = response.json()
    assert info["room"] == "lobby" and info["machine"] == MACHINE
    assert info["outcome"] == "unowned" and info["owner"] is None


@pytest.mark.parametrize("name", BAD_ROOMS)
def test_bad_room_names_are_refused(client: TestClient, name: str) -> None:
    response = client.get(f"/rooms/{name}")
    assert response.status_code == 400
    assert "lowercase letters" in response.json()["error"]
    assert name not in response.text


def test_room_messages_reach_every_socket_in_the_room(client: TestClient) -> None:
    with (
        client.websocket_connect("/rooms/team/ws") as first,
        client.websocket_connect("/rooms/team/ws") as second,
    ):
        hello: dict[str, Any] = first.receive_json()
        assert hello["type"] == "joined" and hello["room"] == "team"
        assert hello["machine"] == MACHINE and hello["outcome"] == "unowned"
        assert second.receive_json()["type"] == "joined"
        first.send_text("<b>hi</b>")
        for ws in (first, second):
            message = ws.receive_json()
            assert message["text"] == "<b>hi</b>" and message["from"] == hello["you"]
        second.send_text("x" * 501)
        assert "at most 500" in second.receive_json()["error"]
    with client.websocket_connect("/rooms/team/ws") as later:
        assert [m["text"] for m in later.receive_json()["messages"]] == ["<b>hi</b>"]
    with client.websocket_connect("/rooms/other/ws") as elsewhere:
        assert elsewhere.receive_json()["messages"] == []


def test_bad_room_websocket_is_refused(client: TestClient) -> None:
    with client.websocket_connect("/rooms/No_Such/ws") as ws:
        assert "lowercase letters" in ws.receive_json()["error"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1008
