"""The local Fly edge proxy's transport: aiohttp in, aiohttp out, routing.py decides.

A development and test tool built on aiohttp (one well-kept library for the server,
the client and websockets in both directions). Fly.io stays the production engine.
Everything Fly-specific is decided in ``routing.py``; this module gathers the facts,
moves bytes and carries out decisions (wake a machine, deliver, stream the answer).
The fleet's internal DNS (``dns.py``) runs alongside, from start() to close().
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .admin import ADMIN_PREFIX, add_admin_routes
from .cache import CacheRule, ReplayCache
from .dns import InternalDns, Vm
from .flytoml import Autostop
from .machines import Counters, Fleet, Machine, MachineError, address_text
from .replay import JSON_CONTENT_TYPE, Replay, ReplayError, is_path, parse_header, parse_json
from .routing import (
    Decision,
    Deliver,
    FleetFacts,
    Refuse,
    RequestFacts,
    after_failure,
    edge_headers,
    machines_to_stop,
    route_replay,
    route_request,
)

__all__ = ["ADMIN_PREFIX", "Emulator"]

#: Fly refuses to replay a request with a larger body. The library's own copy is
#: flysticky.core.REPLAY_BODY_LIMIT; the emulator keeps its own because it stands for
#: Fly's proxy, which the library is tested against, and must not move with it.
REPLAY_BODY_LIMIT = 1024 * 1024
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
#: Listening addresses meaning "every interface", and the loopback to browse instead
#: (asyncio binds "::" IPv6-only, so its loopback is ::1).
_BROWSABLE = {"0.0.0.0": "127.0.0.1", "::": "::1"}
#: Close codes that may not be sent in a close frame (RFC 6455 7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})


class NotDelivered(Exception):
    """The machine could not be reached: not a byte of the request went to it."""


class DeliveryFailed(Exception):
    """The machine had the request (or part of it) and then failed or timed out."""

    def __init__(self, reason: Literal["timeout", "retries_exhausted"], detail: str) -> None:
        super().__init__(detail)
        self.reason: Literal["timeout", "retries_exhausted"] = reason


@dataclass
class Body:
    """The request body: held whole when a replay could need it (up to 1 MiB), otherwise
    its first part, with the rest streamed from the client to the one machine it goes to."""

    head: bytes
    complete: bool
    rest: aiohttp.StreamReader | None = None
    started: bool = False  # some of it has been handed to a machine

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self.head:
            yield self.head
        if self.rest is not None:
            async for chunk in self.rest.iter_chunked(CHUNK):
                yield chunk


@dataclass
class Answer:
    """What a machine answered: a replay to follow, or a response to pass on."""

    replay: Replay | None
    headers: CIMultiDictProxy[str]
    status: int
    finish: Callable[[], Awaitable[web.StreamResponse]]
    invalid: str | None = None  # why a replay answer was refused


@dataclass
class Stats:
    proxy_errors: int = 0  # answers the proxy gave itself (x-fly-emulator-error)


class Emulator:
    """Fronts a Fleet on one local port, following Fly's routing rules."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        cache_rules: list[CacheRule] | None = None,
        edge_region: str | None = None,
        forwarded_proto: str = "http",
        autostop: Autostop | None = None,
        idle_after: float = 60.0,
        dns_port: int = 0,
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.cache = ReplayCache(cache_rules or [])
        self.edge_region = edge_region or fleet.regions[0]
        self.forwarded_proto = forwarded_proto
        self.autostop = autostop or Autostop()
        self.idle_after = idle_after  # Fly's "every few minutes", shortened for a laptop
        self.stats = Stats()
        self._rotation = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._ready = asyncio.Event()  # requests that arrive during start-up wait for it
        self._autostopper: asyncio.Task[None] | None = None
        self.dns = InternalDns(fleet.app_name, fleet.primary_region, self._vms, port=dns_port)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, machines: int) -> None:
        # Before any machine: each is told where the DNS is, and may ask it at once.
        await self.dns.start()
        host, port = self.dns.address
        self.fleet.resolver = f"{host}:{port}"
        app = web.Application()
        add_admin_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(
            # Idle connections to machines are dropped before any server drops them
            # (Hypercorn: 5 s), so a request is never written to a socket closing under it.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # SO_REUSEADDR (aiohttp's default): a port whose last connections are in
        # TIME_WAIT is free; one with a live listener still is not.
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await self.close()
            reason = error.strerror or str(error)
            raise OSError(f"cannot listen on {self.host}:{self.port}: {reason}") from None
        if self.port == 0:
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.port = int(server.sockets[0].getsockname()[1])
        try:
            for _ in range(machines):
                await self.fleet.add()
        except BaseException:
            await self.close()
            raise
        if self.autostop.stop != "off":
            self._autostopper = asyncio.create_task(self._autostop_rounds())
        self._ready.set()

    async def close(self) -> None:
        if self._autostopper is not None:
            self._autostopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._autostopper
            self._autostopper = None
        await self.fleet.close()
        await self.dns.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Emulator:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """Where a browser on this computer reaches the proxy: an address that means
        every interface (0.0.0.0, ::) is not one to open, so its loopback is given."""
        host = _BROWSABLE.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def client(self) -> aiohttp.ClientSession:
        """The HTTP client the emulator reaches machines with (started)."""
        assert self._session is not None, "the emulator is not started"
        return self._session

    @property
    def dns_address(self) -> tuple[str, int]:
        """Where the fleet's internal DNS answers, UDP and TCP."""
        return self.dns.address

    def _vms(self) -> list[Vm]:
        return [Vm(m.id, m.region, m.facts().state, m.private_ip) for m in self.fleet.machines]

    def totals(self) -> Counters:
        total = Counters()
        for machine in self.fleet.machines:
            total.add(machine.counters)
        return total

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": m.id,
                "region": m.region,
                "state": m.facts().state,
                "host": m.host,
                "port": m.port,
                "private_ip": address_text(m.private_ip),
                "pid": m.pid,
                "requests": m.counters.requests,
                "served": m.counters.served,
                "replays": m.counters.replays,
                "cache_hits": m.counters.cache_hits,
                "errors": m.counters.errors,
            }
            for m in self.fleet.machines
        ]

    def fleet_facts(self) -> FleetFacts:
        return FleetFacts(
            tuple(m.facts() for m in self.fleet.machines),
            self.fleet.app_name,
            self.edge_region,
            self.fleet.primary_region,
            self.autostop.start,
        )

    async def destroy(self, machine: Machine) -> None:
        """Destroy a machine and forget every replay-cache entry that named it."""
        await self.fleet.destroy(machine)
        self.cache.forget_machine(machine.id)

    # ------------------------------------------------------------------ autostop
    async def _autostop_rounds(self) -> None:
        while True:
            await asyncio.sleep(self.idle_after / 4)
            now = time.monotonic()
            idle = {
                m.id: now - m.last_active
                for m in self.fleet.machines
                if m.in_flight == 0 and not m.lock.locked()
            }
            for machine_id in machines_to_stop(
                self.fleet_facts(), idle, self.idle_after, self.autostop.min_running
            ):
                machine = self.fleet.get(machine_id)
                if machine is None:
                    continue
                with contextlib.suppress(MachineError):
                    if self.autostop.stop == "suspend":
                        await self.fleet.suspend(machine)
                    else:
                        await self.fleet.stop(machine)

    # ------------------------------------------------------------------ routing
    def _request_facts(self, request: web.Request, replayable: bool) -> RequestFacts:
        target = request.raw_path
        if not is_path(target):  # absolute-form and the like: never a new host
            target = request.rel_url.raw_path_qs
        return RequestFacts(
            host=(request.url.host or "").lower(),
            path=request.path,
            target=target,
            headers=request.headers,
            body_replayable=replayable,
            turn=next(self._rotation),
        )

    def _base_headers(self, request: web.Request) -> CIMultiDict[str]:
        return CIMultiDict(
            edge_headers(
                list(request.headers.items()),
                client_ip=request.remote or "127.0.0.1",
                proto=self.forwarded_proto,
                port=self.port,
                edge_region=self.edge_region,
                request_id=secrets.token_hex(13),
                http_version=f"{request.version.major}.{request.version.minor}",
            )
        )

    async def _route(
        self,
        request: web.Request,
        replayable: bool,
        send: Callable[[Machine, Deliver, CIMultiDict[str]], Awaitable[Answer]],
    ) -> web.StreamResponse:
        facts = self._request_facts(request, replayable)
        base = self._base_headers(request)

        def first(facts: RequestFacts) -> Decision:
            return route_request(facts, self.fleet_facts(), self.cache)

        step = first
        decision = step(facts)
        hops = 0
        loop = asyncio.get_running_loop()
        while True:
            if isinstance(decision, Refuse):
                return self._refuse(decision)
            decision.cache.apply(self.cache)
            machine = self.fleet.get(decision.machine)
            assert machine is not None, "routing chose a machine the fleet does not have"
            try:
                if decision.wake:
                    await self.fleet.start(machine)
                if decision.cache_hit:
                    machine.counters.cache_hits += 1
                machine.counters.requests += 1
                began = loop.time()
                answer = await send(machine, decision, _headers_for(base, decision))
            except (MachineError, NotDelivered):
                # It could not start, or refused the connection: nothing was sent, so the
                # same rule may choose again without it.
                machine.counters.errors += 1
                facts = replace(facts, unavailable=facts.unavailable | {machine.id})
                decision = step(facts)
                continue
            except DeliveryFailed as failure:
                machine.counters.errors += 1
                elapsed = int((loop.time() - began) * 1000)
                decision = after_failure(
                    facts, self.fleet_facts(), decision, failure.reason, elapsed
                )
                continue
            if answer.invalid is not None:
                machine.counters.errors += 1
                return self._refuse(Refuse(502, "invalid_replay", answer.invalid))
            if answer.replay is None:
                if answer.status >= 500:
                    machine.counters.errors += 1
                if answer.headers.get("fly-replay-cache") == "invalidate" and decision.path_cache:
                    self.cache.forget_path(decision.path_cache)
                machine.counters.served += 1
                return await answer.finish()
            machine.counters.replays += 1
            hops += 1
            previous, replay, answer_headers = decision, answer.replay, answer.headers

            def after_replay(
                facts: RequestFacts,
                previous: Deliver = previous,
                replay: Replay = replay,
                answer_headers: CIMultiDictProxy[str] = answer_headers,
                hops: int = hops,
            ) -> Decision:
                return route_replay(
                    facts,
                    self.fleet_facts(),
                    self.cache,
                    previous,
                    replay,
                    answer_headers,
                    hops,
                    time.time_ns() // 1000,
                )

            step = after_replay
            # A new replay starts from the machines as they are now.
            facts = replace(facts, unavailable=frozenset())
            decision = step(facts)

    def _refuse(self, refusal: Refuse) -> web.Response:
        self.stats.proxy_errors += 1
        return web.Response(
            status=refusal.status,
            text=f"flysticky proxy emulator: {refusal.message}\n",
            headers={"x-fly-emulator-error": refusal.code},
        )

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._ready.is_set():
            await self._ready.wait()
        response: web.StreamResponse | None = None
        try:
            if request.headers.get("upgrade", "").lower() == "websocket":
                return await self._websocket(request)
            body = await _read_body(request)

            async def send(
                machine: Machine, delivery: Deliver, headers: CIMultiDict[str]
            ) -> Answer:
                return await self._send_http(request, machine, delivery, headers, body)

            response = await self._route(request, body.complete, send)
            return response
        except ConnectionError:
            # The client hung up: nothing to answer, nothing worth a traceback.
            return response or web.Response(status=499)

    def _url(self, machine: Machine, target: str) -> URL:
        path, _, query = target.partition("?")
        return URL.build(
            scheme="http",
            host=machine.host,
            port=machine.port,
            path=path,
            query_string=query,
            encoded=True,
        )

    async def _send_http(
        self,
        request: web.Request,
        machine: Machine,
        delivery: Deliver,
        headers: CIMultiDict[str],
        body: Body,
    ) -> Answer:
        assert self._session is not None
        data: bytes | AsyncIterator[bytes] | None
        if body.complete:
            data = body.head if body.head or request.method not in ("GET", "HEAD") else None
        else:
            data = body.chunks()
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        busy = contextlib.ExitStack()
        busy.enter_context(machine.busy())
        try:
            async with asyncio.timeout(delivery.timeout):
                upstream = await self._session.request(
                    request.method,
                    self._url(machine, delivery.target),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                )
            replay, invalid = await _replay_of(upstream)
        except aiohttp.ClientConnectorError as error:
            busy.close()
            raise NotDelivered(str(error)) from None
        except TimeoutError:
            busy.close()
            raise DeliveryFailed(
                "timeout", f"machine {machine.id} did not answer in time"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            busy.close()
            raise DeliveryFailed("retries_exhausted", f"machine {machine.id}: {error}") from None
        if replay is not None or invalid is not None:
            upstream.release()
            busy.close()

        async def finish() -> web.StreamResponse:
            with busy:
                async with upstream:
                    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                    for name, value in upstream.headers.items():
                        if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                            response.headers.add(name, value)
                    await response.prepare(request)
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        async for chunk in upstream.content.iter_chunked(CHUNK):
                            await response.write(chunk)
                    await response.write_eof()
                    return response

        return Answer(replay, upstream.headers, upstream.status, finish, invalid)

    # ------------------------------------------------------------------ websockets
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        protocols = [
            p.strip()
            for p in request.headers.get("sec-websocket-protocol", "").split(",")
            if p.strip()
        ]
        if not web.WebSocketResponse(protocols=protocols).can_prepare(request).ok:
            # Checked before any machine is asked, so no upstream socket is left open.
            return self._refuse(
                Refuse(400, "bad_websocket_handshake", "not a valid websocket handshake")
            )

        async def send(machine: Machine, delivery: Deliver, headers: CIMultiDict[str]) -> Answer:
            return await self._send_websocket(request, machine, delivery, headers, protocols)

        return await self._route(request, True, send)

    async def _send_websocket(
        self,
        request: web.Request,
        machine: Machine,
        delivery: Deliver,
        headers: CIMultiDict[str],
        protocols: list[str],
    ) -> Answer:
        assert self._session is not None
        for name in WEBSOCKET_HANDSHAKE:
            headers.popall(name, None)
        try:
            async with asyncio.timeout(delivery.timeout):
                upstream = await self._session.ws_connect(
                    self._url(machine, delivery.target),
                    headers=headers,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                    autoping=True,
                    autoclose=False,
                )
        except aiohttp.ClientConnectorError as error:
            raise NotDelivered(str(error)) from None
        except TimeoutError:
            raise DeliveryFailed(
                "timeout", f"machine {machine.id} did not answer in time"
            ) from None
        except aiohttp.WSServerHandshakeError as refused:
            # The machine answered the handshake without upgrading: a replay, or a refusal.
            answer_headers = CIMultiDictProxy(CIMultiDict(refused.headers or {}))
            status = refused.status
            replay, invalid = _header_replay(answer_headers)

            async def refuse() -> web.StreamResponse:
                kept = CIMultiDict(
                    (k, v) for k, v in answer_headers.items() if k.lower() not in HOP_BY_HOP
                )
                return web.Response(status=status, headers=kept)

            return Answer(replay, answer_headers, status, refuse, invalid)
        except (aiohttp.ClientError, OSError) as error:
            raise DeliveryFailed("retries_exhausted", f"machine {machine.id}: {error}") from None

        async def finish() -> web.StreamResponse:
            # autoclose off on both sides: aiohttp would answer a close frame with 1000
            # at once, and RFC 6455 5.5.1 has the reply echo the sender's code.
            client = web.WebSocketResponse(protocols=protocols, autoping=True, autoclose=False)
            try:
                with machine.busy():
                    await client.prepare(request)
                    await _pump_both_ways(client, upstream)
            finally:
                await upstream.close()
            return client

        return Answer(None, CIMultiDictProxy(CIMultiDict()), 101, finish)


def _headers_for(base: CIMultiDict[str], delivery: Deliver) -> CIMultiDict[str]:
    headers = base.copy()
    for name in delivery.delete_headers:
        headers.popall(name, None)
    for name, value in delivery.set_headers:
        headers[name] = value
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def _read_body(request: web.Request) -> Body:
    """Hold the body only when a replay could need it: up to 1 MiB."""
    length = request.content_length
    if length is not None and length > REPLAY_BODY_LIMIT:
        return Body(b"", False, request.content)
    held = bytearray()
    while len(held) <= REPLAY_BODY_LIMIT:
        chunk = await request.content.read(REPLAY_BODY_LIMIT + 1 - len(held))
        if not chunk:
            return Body(bytes(held), True)
        held += chunk
    return Body(bytes(held), False, request.content)


def _header_replay(headers: CIMultiDictProxy[str]) -> tuple[Replay | None, str | None]:
    header = headers.get("fly-replay")
    if header is None:
        return None, None
    try:
        return parse_header(header), None
    except ReplayError as error:
        return None, str(error)


async def _replay_of(upstream: aiohttp.ClientResponse) -> tuple[Replay | None, str | None]:
    """The replay a machine's answer asks for (JSON body or header), or why it is invalid.

    The JSON form is read only up to 1 MiB: a replay instruction is small.
    """
    content_type = upstream.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON_CONTENT_TYPE:
        return _header_replay(upstream.headers)
    body = await upstream.content.read(REPLAY_BODY_LIMIT + 1)
    if len(body) > REPLAY_BODY_LIMIT:
        return None, "the fly-replay JSON body is over 1 MiB"
    try:
        return parse_json(body), None
    except ReplayError as error:
        return None, str(error)


def _close_code(code: int | None, fallback: int) -> int:
    """The code to pass on: the peer's own, or ``fallback`` when it sent none it could."""
    if code is None or code in _UNSENDABLE:
        return fallback
    return code


async def _forward(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await target.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await target.send_bytes(message.data)


async def _pump_both_ways(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay frames until one side closes, then close the other with the same code, and
    answer the side that closed with its own code (RFC 6455 5.5.1: the reply echoes it).

    A machine that vanishes without a close frame (killed, crashed) gives the client
    1011 (internal error), not a clean 1000; a client that vanishes gives the machine
    1001 (going away).
    """
    to_machine = asyncio.ensure_future(_forward(client, upstream))
    to_client = asyncio.ensure_future(_forward(upstream, client))
    done, pending = await asyncio.wait((to_machine, to_client), return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with contextlib.suppress(ConnectionError, RuntimeError):
        if to_client in done:
            code = _close_code(upstream.close_code, 1011)
            await client.close(code=code, message=b"" if code != 1011 else b"machine went away")
            await upstream.close(code=_close_code(upstream.close_code, 1000))
        else:
            await upstream.close(code=_close_code(client.close_code, 1001))
            await client.close(code=_close_code(client.close_code, 1000))
