"""The adapters on real servers, with real clients and raw sockets.

Sanic on its own server and on Uvicorn (ASGI); Quart on Hypercorn and on Uvicorn; the ASGI
middleware under Starlette, FastAPI and Litestar on Uvicorn and Hypercorn.
Websocket handshakes are decided before the upgrade: a replay is an HTTP 307.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import websockets
from websockets.exceptions import InvalidStatus

from flysticky.proxy.machines import Fleet, Machine

from .emulator_fixtures import HERE, assert_all_stopped

OTHER = "148ed193b04d89"
SERVE = [sys.executable, "-m", "flysticky.proxy.serve", "tests.apps.sticky:app"]
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "tests.apps.sticky:app",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--log-level",
    "warning",
]
SERVERS = {
    "sanic-own-server": ("sanic", SERVE, False),
    "sanic-own-server-with-app-hook": ("sanic", SERVE, True),
    "sanic-uvicorn": ("sanic", UVICORN, False),
    "sanic-uvicorn-with-app-hook": ("sanic", UVICORN, True),
    "quart-hypercorn": ("quart", SERVE, False),
    "quart-uvicorn": ("quart", UVICORN, False),
    # flysticky.asgi: Starlette by its middleware list, FastAPI wrapped, Litestar's plugin.
    "starlette-uvicorn": ("starlette", UVICORN, False),
    "fastapi-uvicorn": ("fastapi", UVICORN, False),
    "fastapi-hypercorn": ("fastapi", SERVE, False),
    "litestar-hypercorn": ("litestar", SERVE, False),
    "litestar-uvicorn": ("litestar", UVICORN, False),
}


# One machine per server for the whole module (each test sends its own requests, and
# none changes the machine): starting a process per test was most of the suite's time.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(SERVERS))
async def machine(request: pytest.FixtureRequest) -> AsyncIterator[Machine]:
    framework, command, hook = SERVERS[request.param]
    env = {"STICKY_FRAMEWORK": framework, "PYTHONPATH": str(HERE.parent)}
    if hook:
        env["STICKY_APP_HOOK"] = "1"
    fleet = Fleet(
        command,
        env=env,
        cwd=HERE.parent,
    )
    try:
        yield await fleet.add()
    finally:
        pids = [m.pid for m in fleet.machines]
        await fleet.close()
        assert_all_stopped(pids)


async def raw_request(machine: Machine, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are, read the whole answer: what a hostile client does."""
    reader, writer = await asyncio.open_connection(machine.host, machine.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1 << 20), 10)
    writer.close()
    head = data.split(b"\r\n\r\n", 1)[0]
    return int(head.split(b" ")[1]), head


def ws_url(machine: Machine) -> str:
    return f"ws://{machine.host}:{machine.port}/ws"


async def test_websocket_handshake_for_another_machine_is_a_307_replay(machine: Machine) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            ws_url(machine), additional_headers={"Cookie": f"fly-machine-id={OTHER}"}
        ):
            pass
    response = refused.value.response
    assert response.status_code == 307
    assert response.headers["fly-replay"] == f"prefer_instance={OTHER}"
    assert "sec-websocket-accept" not in response.headers  # the upgrade never happened


async def test_websocket_handshake_for_this_machine_connects(machine: Machine) -> None:
    for cookie in (f"fly-machine-id={machine.id}", None):
        headers = {"Cookie": cookie} if cookie else {}
        async with websockets.connect(ws_url(machine), additional_headers=headers) as ws:
            assert await asyncio.wait_for(ws.recv(), 10) == machine.id
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 10) == f"{machine.id}:hi"


async def test_replayed_websocket_handshake_is_served_here(machine: Machine) -> None:
    headers = {"Cookie": f"fly-machine-id={OTHER}", "fly-replay-src": f"instance={OTHER}"}
    async with websockets.connect(ws_url(machine), additional_headers=headers) as ws:
        assert await asyncio.wait_for(ws.recv(), 10) == machine.id


@pytest.mark.parametrize(
    "cookie",
    [
        b"fly-machine-id=abc\x01def",
        b"fly-machine-id=abc\x7f",
        b"fly-machine-id=\xc3\xa9t\xc3\xa9",
        b"fly-machine-id=abc\tapp=admin",
        b"fly-machine-id=" + b"9" * 5000,
    ],
)
async def test_hostile_raw_cookie_bytes_are_no_cookie(machine: Machine, cookie: bytes) -> None:
    request = (
        b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nCookie: "
        + cookie
        + b"\r\n\r\n"
    )
    status, head = await raw_request(machine, request)
    if status == 400:  # the server itself refused the bytes: also safe
        return
    assert status == 200
    lower = head.lower()
    assert b"fly-replay" not in lower
    assert f"set-cookie: fly-machine-id={machine.id}; max-age=518400".encode() in lower
    for fragment in (b"app=admin", b"\xc3\xa9", b"\x01", b"\x7f", b"99999999"):
        assert fragment not in head


async def test_chunked_body_is_served_off_pin(machine: Machine) -> None:
    chunk = b"x" * 1000
    request = (
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + f"Cookie: fly-machine-id={OTHER}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    status, head = await raw_request(machine, request)
    assert status == 200
    assert b"fly-replay" not in head.lower()


async def test_content_length_at_and_over_the_limit(machine: Machine) -> None:
    for size, expected in ((1024 * 1024, 307), (1024 * 1024 + 1, 200)):
        request = (
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + f"Cookie: fly-machine-id={OTHER}\r\nContent-Length: {size}\r\n\r\n".encode()
            + b"x" * size
        )
        status, _ = await raw_request(machine, request)
        assert status == expected, size
