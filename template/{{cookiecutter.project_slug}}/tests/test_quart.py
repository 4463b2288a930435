"""The app through Quart's test client."""

from app import app
from tests.conftest import MACHINE, OTHER

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
    assert MACHINE in await response.get_data(as_text=True)


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
