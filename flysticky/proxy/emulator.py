"""The local Fly edge proxy: load balancing, edge headers, fly-replay, replay cache, websockets.

A development and test tool built on aiohttp (one well-kept library for the server,
the client and websockets in both directions). Fly.io stays the production engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .cache import CacheRule, ReplayCache
from .machines import Counters, Fleet, Machine
from .replay import JSON_CONTENT_TYPE, Replay, ReplayError, parse_header, parse_json, region_matches

#: Fly refuses to replay a request with a larger body.
REPLAY_BODY_LIMIT = 1024 * 1024
#: Replays one request may go through before the proxy gives up (a loop).
MAX_REPLAYS = 10
ADMIN_PREFIX = "/.fly-emulator"
BODY = web.RequestKey("flysticky.body", bytes)  # the buffered request body, for replays
HOPS = web.RequestKey("flysticky.hops", int)
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
# Headers only the proxy may set: a client cannot forge its way past a replay.
PROXY_ONLY = frozenset(
    {
        "fly-client-ip",
        "fly-forwarded-port",
        "fly-region",
        "fly-request-id",
        "fly-replay-src",
        "fly-replay-failed",
        "fly-preferred-instance-unavailable",
        "fly-replay-cache-status",
        "x-forwarded-ssl",
        "x-forwarded-port",
        "x-forwarded-proto",
        "via",
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


class ProxyError(Exception):
    """Answered to the client as an error from the proxy itself."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Delivery:
    """One attempt to hand the request to a machine."""

    machine: Machine
    headers: CIMultiDict[str]
    path: str
    timeout: float | None = None
    replay: Replay | None = None  # the replay that led here
    origin: Machine | None = None  # the machine that issued that replay
    fallback: bool = False
    path_cache: str | None = None  # the path-cache pattern that routed it here


@dataclass
class Answer:
    """What a machine answered, before the proxy decides what to do with it."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes = b""
    finish: Callable[[], Awaitable[web.StreamResponse]] | None = None


class Timeout(Exception):
    pass


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
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.cache = ReplayCache(cache_rules or [])
        self.edge_region = edge_region or fleet.regions[0]
        self.forwarded_proto = forwarded_proto
        self.stats = Stats()
        self._rotation = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._ready = asyncio.Event()  # requests that arrive during start-up wait for it

    # ------------------------------------------------------------------ lifecycle
    async def start(self, machines: int) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", ADMIN_PREFIX + "/machines", self._admin_machines)
        app.router.add_route("POST", ADMIN_PREFIX + "/machines/{id}/{action}", self._admin_action)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
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
            reason = os.strerror(error.errno) if error.errno else str(error)
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
        self._ready.set()

    async def close(self) -> None:
        await self.fleet.close()
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
        return f"http://{self.host}:{self.port}"

    def totals(self) -> Counters:
        total = Counters()
        for machine in self.fleet.machines:
            total.add(machine.counters)
        return total

    # ------------------------------------------------------------------ routing
    def _edge_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in PROXY_ONLY
        )
        client_ip = request.remote or "127.0.0.1"
        forwarded = request.headers.get("x-forwarded-for")
        headers["X-Forwarded-For"] = f"{forwarded}, {client_ip}" if forwarded else client_ip
        headers["Fly-Client-IP"] = client_ip
        headers["X-Forwarded-Proto"] = self.forwarded_proto
        headers["X-Forwarded-Port"] = str(self.port)
        headers["X-Forwarded-SSL"] = "on" if self.forwarded_proto == "https" else "off"
        headers["Fly-Forwarded-Port"] = str(self.port)
        headers["Fly-Region"] = self.edge_region
        headers["Fly-Request-Id"] = f"{secrets.token_hex(13)}-{self.edge_region}"
        headers["Via"] = f"{request.version.major}.{request.version.minor} fly.io"
        return headers

    def _balance(
        self, exclude: set[str] | None = None, regions: tuple[str, ...] = ()
    ) -> Machine | None:
        live = [m for m in self.fleet.live() if not exclude or m.id not in exclude]
        if regions:
            for wanted in regions:
                matching = [m for m in live if region_matches(wanted, m.region)]
                if matching:
                    live = matching
                    break
            else:
                return None
        else:
            nearest = [m for m in live if m.region == self.edge_region]
            live = nearest or live
        if not live:
            return None
        return live[next(self._rotation) % len(live)]

    def _first_delivery(self, request: web.Request, headers: CIMultiDict[str]) -> Delivery:
        path = request.raw_path
        forced = request.headers.get("fly-force-instance-id")
        if forced:
            machine = self.fleet.get(forced)
            if machine is None or not machine.alive:
                raise ProxyError(
                    503, "forced_instance_unavailable", f"machine {forced} is not running"
                )
            return Delivery(machine, headers, path)
        preferred = request.headers.get("fly-prefer-instance-id")
        if preferred:
            machine = self.fleet.get(preferred)
            if machine is not None and machine.alive:
                return Delivery(machine, headers, path)
            headers["fly-preferred-instance-unavailable"] = preferred
        host = request.host.split(":")[0].lower()
        hit = self.cache.lookup_path(host, request.path)
        if hit is not None:
            machine = self.fleet.get(hit[1])
            if machine is not None and machine.alive:
                headers["fly-replay-cache-status"] = "hit"
                machine.counters.cache_hits += 1
                return Delivery(machine, headers, path, path_cache=hit[0])
            self.cache.forget_path(hit[0])
        rule = self.cache.rule_for(host, request.path)
        if rule is not None:
            key = rule.key(request.headers)
            bypass = (
                rule.allow_bypass
                and request.headers.get("fly-replay-cache-control", "").strip().lower() == "skip"
            )
            target_id = self.cache.lookup_session(rule, key) if key and not bypass else None
            if target_id is not None:
                machine = self.fleet.get(target_id)
                if machine is not None and machine.alive:
                    headers["fly-replay-cache-status"] = "hit"
                    machine.counters.cache_hits += 1
                    return Delivery(machine, headers, path)
                self.cache.forget_session(rule, key or "")
        machine = self._balance()
        if machine is None:
            raise ProxyError(503, "no_machines", "no machine of the app is running")
        return Delivery(machine, headers, path)

    def _replay_of(self, answer: Answer) -> Replay | None:
        content_type = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == JSON_CONTENT_TYPE:
            return parse_json(answer.body)
        header = answer.headers.get("fly-replay")
        return parse_header(header) if header is not None else None

    def _replay_target(self, replay: Replay, origin: Machine) -> tuple[Machine | None, str | None]:
        """The machine a replay goes to, and the unavailable preferred id if any."""
        if replay.app is not None and replay.app != self.fleet.app_name:
            return None, None
        exclude = {origin.id} if replay.elsewhere else set()
        if replay.instance is not None:
            machine = self.fleet.get(replay.instance)
            return (machine if machine is not None and machine.alive else None), None
        if replay.prefer_instance is not None:
            machine = self.fleet.get(replay.prefer_instance)
            if machine is not None and machine.alive and machine.id not in exclude:
                return machine, None
            return self._balance(exclude, replay.regions), replay.prefer_instance
        return self._balance(exclude, replay.regions), None

    def _replayed_delivery(
        self,
        request: web.Request,
        base: CIMultiDict[str],
        previous: Delivery,
        replay: Replay,
        answer: Answer,
    ) -> Delivery:
        origin = previous.machine
        if previous.fallback:
            raise ProxyError(502, "fallback_replayed", "a fallback request cannot issue fly-replay")
        if len(request.get(BODY, b"")) > REPLAY_BODY_LIMIT:
            raise ProxyError(
                502, "body_too_large", "the request body is over 1 MiB and cannot be replayed"
            )
        hops = request.get(HOPS, 0) + 1
        request[HOPS] = hops
        if hops > MAX_REPLAYS:
            raise ProxyError(502, "replay_loop", f"more than {MAX_REPLAYS} replays: a replay loop")
        target, unavailable = self._replay_target(replay, origin)
        headers = base.copy()
        for name in replay.transform.delete_headers:
            headers.popall(name, None)
        for name, value in replay.transform.set_headers:
            headers[name] = value
        src = f"instance={origin.id};region={origin.region};t={time.time_ns() // 1000}"
        if replay.state is not None:
            src += f";state={replay.state}"
        headers["fly-replay-src"] = src
        if unavailable is not None:
            headers["fly-preferred-instance-unavailable"] = unavailable
        host = request.host.split(":")[0].lower()
        rule = self.cache.rule_for(host, request.path)
        if rule is not None:
            headers["fly-replay-cache-status"] = "miss"
        path = replay.transform.path or previous.path
        if target is None:
            return self._fallback(request, base, replay, origin, "no_candidate", 0.0)
        if rule is not None and replay.cacheable:
            key = rule.key(request.headers)
            if key:
                self.cache.remember_session(rule, key, target.id)
        pattern = replay.cache.pattern or answer.headers.get("fly-replay-cache")
        if replay.cache.invalidate or pattern == "invalidate":
            for stale in (previous.path_cache, replay.cache.pattern):
                if stale:
                    self.cache.forget_path(stale)
        elif pattern:
            ttl = replay.cache.ttl or int(answer.headers.get("fly-replay-cache-ttl-secs", "60"))
            self.cache.remember_path(pattern, target.id, ttl)
        return Delivery(target, headers, path, replay.timeout, replay, origin)

    def _fallback(
        self,
        request: web.Request,
        base: CIMultiDict[str],
        replay: Replay,
        origin: Machine,
        reason: str,
        elapsed: float,
    ) -> Delivery:
        wanted = replay.instance or replay.prefer_instance or ""
        if replay.fallback is None:
            status = 504 if reason == "timeout" else 502
            raise ProxyError(status, reason, f"fly-replay could not be delivered ({reason})")
        machine: Machine | None = origin if origin.alive else None
        if machine is None and replay.fallback == "prefer_self":
            machine = self._balance()
        if machine is None:
            raise ProxyError(502, "fallback_failed", "the fallback machine is not running")
        headers = base.copy()
        headers["fly-replay-failed"] = (
            f"instance={wanted};app={replay.app or self.fleet.app_name};"
            f"region={','.join(replay.regions)};replay_source={origin.id};"
            f"reason={reason};elapsed_ms={int(elapsed * 1000)}"
        )
        return Delivery(machine, headers, request.raw_path, fallback=True)

    async def _route(
        self,
        request: web.Request,
        send: Callable[[Delivery], Awaitable[Answer]],
    ) -> web.StreamResponse:
        base = self._edge_headers(request)
        delivery = self._first_delivery(request, base.copy())
        tried: set[str] = set()
        loop = asyncio.get_running_loop()
        while True:
            machine = delivery.machine
            machine.counters.requests += 1
            began = loop.time()
            try:
                answer = await send(delivery)
            except (aiohttp.ClientConnectionError, Timeout, OSError) as error:
                machine.counters.errors += 1
                if delivery.replay is not None and delivery.origin is not None:
                    reason = "timeout" if isinstance(error, Timeout) else "retries_exhausted"
                    delivery = self._fallback(
                        request, base, delivery.replay, delivery.origin, reason, loop.time() - began
                    )
                    continue
                tried.add(machine.id)
                retry = self._balance(tried) if not delivery.fallback else None
                if retry is None or request.headers.get("fly-force-instance-id"):
                    raise ProxyError(
                        502, "machine_unreachable", f"machine {machine.id}: {error}"
                    ) from None
                delivery = Delivery(retry, delivery.headers, delivery.path)
                continue
            replay = self._replay_of(answer)
            if replay is None:
                if answer.status >= 500:
                    machine.counters.errors += 1
                if answer.headers.get("fly-replay-cache") == "invalidate" and delivery.path_cache:
                    self.cache.forget_path(delivery.path_cache)
                machine.counters.served += 1
                assert answer.finish is not None
                return await answer.finish()
            machine.counters.replays += 1
            delivery = self._replayed_delivery(request, base, delivery, replay, answer)

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._ready.is_set():
            await self._ready.wait()
        try:
            if request.headers.get("upgrade", "").lower() == "websocket":
                return await self._route(request, lambda d: self._send_websocket(request, d))
            request[BODY] = await request.read()
            return await self._route(request, lambda d: self._send_http(request, d))
        except ReplayError as error:
            self.stats.proxy_errors += 1
            return self._error(502, "invalid_replay", str(error))
        except ProxyError as error:
            self.stats.proxy_errors += 1
            return self._error(error.status, error.code, str(error))

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.Response(
            status=status,
            text=f"flysticky proxy emulator: {message}\n",
            headers={"x-fly-emulator-error": code},
        )

    async def _send_http(self, request: web.Request, delivery: Delivery) -> Answer:
        assert self._session is not None
        body: bytes = request[BODY]
        url = f"http://127.0.0.1:{delivery.machine.port}{delivery.path}"
        headers = CIMultiDict(
            (k, v) for k, v in delivery.headers.items() if k.lower() not in HOP_BY_HOP
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=delivery.timeout)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body if body or request.method not in ("GET", "HEAD") else None,
                allow_redirects=False,
                timeout=timeout,
            )
        except TimeoutError:
            raise Timeout() from None
        is_replay = "fly-replay" in upstream.headers or upstream.headers.get(
            "content-type", ""
        ).startswith(JSON_CONTENT_TYPE)
        if is_replay:
            async with upstream:
                return Answer(upstream.status, upstream.headers, await upstream.read())

        async def finish() -> web.StreamResponse:
            async with upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    await response.write(chunk)
                await response.write_eof()
                return response

        return Answer(upstream.status, upstream.headers, finish=finish)

    # ------------------------------------------------------------------ websockets
    async def _send_websocket(self, request: web.Request, delivery: Delivery) -> Answer:
        assert self._session is not None
        url = f"http://127.0.0.1:{delivery.machine.port}{delivery.path}"
        headers = CIMultiDict(
            (k, v)
            for k, v in delivery.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in WEBSOCKET_HANDSHAKE
        )
        protocols = [
            p.strip()
            for p in request.headers.get("sec-websocket-protocol", "").split(",")
            if p.strip()
        ]
        try:
            upstream = await self._session.ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as refused:
            status = refused.status
            answer_headers: CIMultiDictProxy[str] = CIMultiDictProxy(
                CIMultiDict(refused.headers or {})
            )

            async def refuse() -> web.StreamResponse:
                return web.Response(status=status, headers=_plain(answer_headers))

            return Answer(status, answer_headers, finish=refuse)

        async def finish() -> web.StreamResponse:
            client = web.WebSocketResponse(protocols=protocols, autoping=True)
            await client.prepare(request)
            await _pump_both_ways(client, upstream)
            return client

        return Answer(101, CIMultiDictProxy(CIMultiDict()), finish=finish)

    # ------------------------------------------------------------------ admin
    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": m.id,
                "region": m.region,
                "state": m.state if m.state != "started" or m.alive else "crashed",
                "port": m.port,
                "pid": m.pid,
                "requests": m.counters.requests,
                "served": m.counters.served,
                "replays": m.counters.replays,
                "cache_hits": m.counters.cache_hits,
                "errors": m.counters.errors,
            }
            for m in self.fleet.machines
        ]

    async def _admin_machines(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            region = request.query.get("region")
            machine = await self.fleet.add(region)
            return web.json_response({"id": machine.id, "region": machine.region}, status=201)
        return web.json_response(self.describe())

    async def _admin_action(self, request: web.Request) -> web.Response:
        machine = self.fleet.get(request.match_info["id"])
        action = request.match_info["action"]
        if machine is None:
            return web.json_response({"error": "no such machine"}, status=404)
        actions = {
            "kill": self.fleet.kill,
            "stop": self.fleet.stop,
            "start": self.fleet.start,
            "restart": self.fleet.restart,
            "destroy": self.fleet.destroy,
        }
        if action not in actions:
            return web.json_response({"error": f"actions: {sorted(actions)}"}, status=404)
        await actions[action](machine)
        return web.json_response({"id": machine.id, "state": machine.state})


def _plain(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def _forward(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await target.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await target.send_bytes(message.data)
    await target.close()


async def _pump_both_ways(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    tasks = [
        asyncio.ensure_future(_forward(client, upstream)),
        asyncio.ensure_future(_forward(upstream, client)),
    ]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await upstream.close()
    await client.close()
