"""Affinity by key and by session id through every adapter, with discovery asking a real
DNS server (the emulator's internal DNS, serving a fixed fleet) and bodies too big to
replay forwarded to a real server standing in for the other machine."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

import pytest
from aiohttp import web

from flysticky import REPLAY_BODY_LIMIT, StickyConfig, new_session_id
from flysticky.owners import Owners
from flysticky.proxy.dns import InternalDns, Vm

from .asgi_client import LifespanClient
from .conftest import MakeHarness
from .harness import MACHINE, OTHER, request_path

APP = "conf-app"
STOPPED = "e2865013b05e86"  # deployed, stopped: in all.vms, no private address
GONE = "0123456789abcd"  # destroyed: in no answer
OTHER_ADDRESS = "127.0.0.2"  # on Linux every 127/8 address is loopback


def room_key(request: Any) -> str | None:
    path = request_path(request)
    return path.removeprefix("/rooms/") if path.startswith("/rooms/") else None


def room_owned_by(machine: str, members: list[str]) -> str:
    owners = Owners(MACHINE)
    owners.update(members)
    return next(k for k in (f"room{n}" for n in range(1000)) if owners.owner(k) == machine)


@dataclass
class Fleet:
    port: int  # every machine's port (Fly's internal_port)
    seen: list[dict[str, Any]]  # what the other machine received
    unlisted: set[str]  # machines the DNS leaves out of every answer

    def config(self, **options: Any) -> StickyConfig:
        return StickyConfig(
            key=room_key, session_header="mcp-session-id", forward_port=self.port, **options
        )


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def fleet(on_fly: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    seen: list[dict[str, Any]] = []
    unlisted: set[str] = set()

    async def other_machine(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(
            {
                "path": request.raw_path,
                "bytes": len(body),
                "from": request.headers.get("flysticky-forwarded-from"),
                "host": request.headers.get("host"),
            }
        )
        if "x-secret" in request.headers:
            raise AssertionError("a header the client named in Connection was forwarded")
        if request.query.get("drop"):  # took the whole request, then died unanswered
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError
        response = web.json_response({"machine": OTHER, "bytes": len(body)}, status=201)
        response.headers.add("set-cookie", "a=1")
        response.headers.add("set-cookie", "b=2")
        return response

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", other_machine)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port(OTHER_ADDRESS)
    await web.TCPSite(runner, OTHER_ADDRESS, port).start()
    vms = [
        Vm(MACHINE, "iad", "started", IPv6Address("::ffff:127.0.0.1")),
        Vm(OTHER, "iad", "started", IPv6Address(f"::ffff:{OTHER_ADDRESS}")),
        Vm(STOPPED, "ams", "stopped", IPv6Address("::ffff:127.0.0.3")),
    ]
    dns = InternalDns(APP, "iad", lambda: [vm for vm in vms if vm.id not in unlisted])
    await dns.start()
    monkeypatch.setenv("FLY_APP_NAME", APP)
    monkeypatch.setenv("FLYSTICKY_RESOLVER", "{}:{}".format(*dns.address))
    try:
        yield Fleet(port, seen, unlisted)
    finally:
        await dns.close()
        await runner.cleanup()


ALL = [MACHINE, OTHER, STOPPED]
BIG = b"x" * (2 * REPLAY_BODY_LIMIT)


async def test_a_room_owned_here_is_served_here(make: MakeHarness, fleet: Fleet) -> None:
    room = room_owned_by(MACHINE, ALL)
    reply = await make(fleet.config()).request(
        "GET", f"/rooms/{room}", {"cookie": f"fly-machine-id={OTHER}"}
    )
    assert reply.status == 200
    assert reply.decision["outcome"] == "pinned"
    assert (reply.decision["key"], reply.decision["routed_by"]) == (room, "key")
    assert reply.header("fly-replay") is None and reply.header("set-cookie") is None


async def test_a_room_owned_elsewhere_is_replayed_before_any_app_code(
    make: MakeHarness, fleet: Fleet
) -> None:
    harness = make(fleet.config())
    for owner in (OTHER, STOPPED):  # owners="all": a stopped machine keeps its rooms
        reply = await harness.request("GET", f"/rooms/{room_owned_by(owner, ALL)}")
        assert reply.status == 307
        assert reply.header("fly-replay") == f"prefer_instance={owner};state=flysticky-key"
        assert reply.ran == []


async def test_started_owners_leave_stopped_machines_out(make: MakeHarness, fleet: Fleet) -> None:
    harness = make(fleet.config(owners="started"))
    room = room_owned_by(STOPPED, ALL)
    expected = Owners(MACHINE)
    expected.update([MACHINE, OTHER])
    reply = await harness.request("GET", f"/rooms/{room}")
    owner = expected.owner(room)
    if owner == MACHINE:
        assert reply.decision["outcome"] == "pinned"
    else:
        assert reply.header("fly-replay") == f"prefer_instance={OTHER};state=flysticky-key"


async def test_a_room_request_that_arrived_by_replay_is_served(
    make: MakeHarness, fleet: Fleet
) -> None:
    room = room_owned_by(OTHER, ALL)
    reply = await make(fleet.config()).request(
        "GET", f"/rooms/{room}", {"fly-replay-src": f"instance={OTHER};region=iad;t=1"}
    )
    assert reply.status == 200
    assert reply.decision["outcome"] == "unowned"
    assert reply.decision["arrived_by"] == "fly-replay-src"


async def test_a_big_body_goes_to_the_room_owner_over_the_private_network(
    make: MakeHarness, fleet: Fleet
) -> None:
    room = room_owned_by(OTHER, ALL)
    reply = await make(fleet.config()).request(
        "POST", f"/rooms/{room}?x=1", {"host": "conf-app.fly.dev"}, body=BIG
    )
    assert reply.status == 201  # the other machine's answer, streamed back
    assert reply.decision == {"machine": OTHER, "bytes": len(BIG)}
    assert reply.all("set-cookie") == ["a=1", "b=2"]
    assert reply.ran == []  # not served here
    assert fleet.seen == [
        {
            "path": f"/rooms/{room}?x=1",
            "bytes": len(BIG),
            "from": MACHINE,
            "host": "conf-app.fly.dev",
        }
    ]


async def test_a_big_body_goes_to_the_pinned_machine_too(make: MakeHarness, fleet: Fleet) -> None:
    reply = await make(fleet.config()).request(
        "POST", "/", {"cookie": f"fly-machine-id={OTHER}"}, body=BIG
    )
    assert (reply.status, reply.decision) == (201, {"machine": OTHER, "bytes": len(BIG)})
    # A config without keys forwards as well: it applies to the visitor cookie alone.
    plain = StickyConfig(forward_port=fleet.port)
    reply = await make(plain).request("POST", "/", {"cookie": f"fly-machine-id={OTHER}"}, body=BIG)
    assert (reply.status, reply.decision) == (201, {"machine": OTHER, "bytes": len(BIG)})
    assert len(fleet.seen) == 2


@pytest.mark.parametrize("target", [STOPPED, GONE])
async def test_a_big_body_for_a_machine_without_an_address_is_served_here(
    make: MakeHarness, fleet: Fleet, target: str
) -> None:
    reply = await make(fleet.config()).request(
        "POST", "/", {"cookie": f"fly-machine-id={target}"}, body=BIG
    )
    assert reply.status == 200
    assert reply.decision["outcome"] == "off_pin"
    assert reply.decision["pinned_to"] == target
    assert fleet.seen == []


async def test_forwarding_can_be_turned_off(make: MakeHarness, fleet: Fleet) -> None:
    config = fleet.config(forward_large_bodies=False)
    reply = await make(config).request("POST", "/", {"cookie": f"fly-machine-id={OTHER}"}, body=BIG)
    assert reply.decision["outcome"] == "off_pin"
    assert fleet.seen == []


@pytest.mark.parametrize(
    ("session", "status", "replay"),
    [
        (lambda: new_session_id(OTHER), 307, f"prefer_instance={OTHER}"),
        (lambda: new_session_id(STOPPED), 307, f"prefer_instance={STOPPED}"),
        (lambda: new_session_id(MACHINE), 200, None),
        (lambda: new_session_id(GONE), 200, None),  # names no machine of the app
        (lambda: "client-made-id", 200, None),
        (lambda: f"{OTHER};app=evil.x", 200, None),
    ],
)
async def test_a_session_id_goes_to_the_machine_it_names(
    make: MakeHarness, fleet: Fleet, session: Callable[[], str], status: int, replay: str | None
) -> None:
    reply = await make(fleet.config()).request(
        "POST", "/", [("mcp-session-id", session())], body=b"{}"
    )
    assert reply.status == status
    assert reply.header("fly-replay") == replay
    assert reply.header("set-cookie") is None  # API clients get no visitor cookie
    if status == 200:
        assert reply.decision["routed_by"] == "mcp-session-id"


async def test_a_machine_that_dies_after_taking_the_request_is_never_run_twice(
    make: MakeHarness, fleet: Fleet
) -> None:
    # The other machine read the whole body, so it may have acted on it: serving the
    # request here as well could do it twice. The client gets 502.
    reply = await make(fleet.config()).request(
        "POST", "/?drop=1", {"cookie": f"fly-machine-id={OTHER}"}, body=BIG
    )
    assert reply.status == 502
    assert reply.ran == []
    assert len(fleet.seen) == 1


async def test_the_forwarded_target_is_the_one_that_was_routed(
    make: MakeHarness, fleet: Fleet
) -> None:
    room = room_owned_by(OTHER, ALL)
    target = f"/rooms/{room}?a=%41&b=..%2F..%2Fadmin&c=/../x"
    headers = {"connection": "x-secret", "x-secret": "not for the other machine"}
    reply = await make(fleet.config()).request("POST", target, headers, body=BIG)
    assert reply.status == 201
    assert fleet.seen[0]["path"] == target  # byte for byte: nothing normalised


async def test_a_dns_answer_without_this_machine_is_not_trusted(
    make: MakeHarness, fleet: Fleet
) -> None:
    # Another app's machines, or a resolver that is not Fly's: owning every key here, or
    # none, would both be wrong; keys are served where they land.
    fleet.unlisted.add(MACHINE)
    reply = await make(fleet.config()).request("GET", f"/rooms/{room_owned_by(OTHER, ALL)}")
    assert reply.status == 200
    assert reply.decision["outcome"] == "unowned"


@pytest.mark.parametrize("framing", [b"transfer-encoding", b"content-length"])
async def test_asgi_a_client_gone_mid_upload_sends_no_truncated_body(
    fleet: Fleet, framing: bytes
) -> None:
    from flysticky.asgi import StickySessions

    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            for phase in ("startup", "shutdown"):
                await receive()
                await send({"type": f"lifespan.{phase}.complete"})
            return
        ran.append(scope["type"])

    sticky = StickySessions(app, StickyConfig(forward_port=fleet.port))
    value = b"chunked" if framing == b"transfer-encoding" else str(len(BIG)).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "headers": [(b"cookie", f"fly-machine-id={OTHER}".encode()), (framing, value)],
    }
    arriving: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"x" * 65536, "more_body": True},
        {"type": "http.disconnect"},  # the client left half-way
    ]

    async def receive() -> dict[str, Any]:
        if arriving:
            return arriving.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        pass

    async with LifespanClient(sticky):  # starts flysticky's private network
        await asyncio.wait_for(sticky(scope, receive, send), 10)
    await asyncio.sleep(0.2)
    assert fleet.seen == []  # the other machine took no truncated body for a whole one
    assert ran == []  # and it was not served here either
