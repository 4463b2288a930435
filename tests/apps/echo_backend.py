"""A tiny backend for emulator conformance tests: it answers what the query asks.

GET /echo                -> JSON of what arrived (machine, method, path, headers, body size)
ANY /replay?h=VALUE      -> 307 with fly-replay: VALUE, unless the request is a replay or fallback
ANY /replay-always?h=V   -> 307 with fly-replay: V, always (a loop)
ANY /json-replay?b=JSON  -> 200, application/vnd.fly.replay+json, body JSON
GET /slow?s=SECONDS      -> sleeps, then echoes
GET /ws                  -> websocket that says its machine id, then echoes
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

MACHINE = os.environ["FLY_MACHINE_ID"]


async def describe(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "machine": MACHINE,
            "region": os.environ["FLY_REGION"],
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_size": len(body),
        },
        headers={k: v for k, v in request.query.items() if k.startswith("x-resp-")},
    )


async def replay(request: web.Request) -> web.StreamResponse:
    arrived = request.headers.get("fly-replay-src") or request.headers.get("fly-replay-failed")
    target = request.query.get("only")
    if (arrived or (target and target == MACHINE)) and request.path == "/replay":
        return await describe(request)
    await request.read()
    extra = {k[7:]: v for k, v in request.query.items() if k.startswith("x-resp-")}
    return web.Response(status=307, headers={"fly-replay": request.query["h"], **extra})


async def json_replay(request: web.Request) -> web.StreamResponse:
    if request.headers.get("fly-replay-src") or request.headers.get("fly-replay-failed"):
        return await describe(request)
    return web.Response(
        status=200, body=request.query["b"].encode(), content_type="application/vnd.fly.replay+json"
    )


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(float(request.query.get("s", "1")))
    return await describe(request)


async def websocket(request: web.Request) -> web.StreamResponse:
    if "h" in request.query and not request.headers.get("fly-replay-src"):
        return web.Response(status=307, headers={"fly-replay": request.query["h"]})
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(MACHINE)
    async for message in ws:
        await ws.send_str(f"{MACHINE}:{message.data}")
    return ws


app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_route("*", "/echo", describe)
app.router.add_route("*", "/replay", replay)
app.router.add_route("*", "/replay-always", replay)
app.router.add_route("*", "/json-replay", json_replay)
app.router.add_get("/slow", slow)
app.router.add_get("/ws", websocket)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None, access_log=None)
