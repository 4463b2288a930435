"""The app through Sanic's ASGI test client."""

import pytest
from sanic_testing.testing import SanicASGITestClient

from app import app
from tests.conftest import MACHINE, OTHER

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


async def test_other_machine_is_replayed(client: SanicASGITestClient) -> None:
    _, response = await client.get("/", cookies={COOKIE: OTHER})
    assert response.status_code == 307
    assert response.headers["fly-replay"] == f"prefer_instance={OTHER}"


async def test_upload(client: SanicASGITestClient) -> None:
    _, response = await client.post("/api/upload", content=b"x" * 1000, cookies={COOKIE: MACHINE})
    assert response.json == {"machine": MACHINE, "bytes": 1000}
