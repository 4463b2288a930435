"""A tiny backend for emulator conformance tests: it answers what the query asks.

GET /echo                -> JSON of what arrived (machine, method, path, headers, body size)
ANY /replay?h=VALUE      -> 307 with fly-replay: VALUE, unless the request is a replay or fallback
ANY /replay-always?h=V   -> 307 with fly-replay: V, always (a loop)
ANY /json-replay?b=JSON  -> 200, application/vnd.fly.replay+json, body JSON
GET /slow?s=SECONDS      -> sleeps, then echoes
GET /ws                  -> websocket that says its machine id, then echoes; "close N"
                            makes it close with code N
GET /ws-stats            -> JSON: websockets open now, the close code of the last one
GET /count               -> JSON: a counter kept in this process's memory, incremented
POST /sink               -> reads the body in chunks, answers its size (no buffering)
POST /die                -> reads the body, then the process SIGKILLs itself
GET /shout?n=N           -> prints one line of N characters, then echoes
GET /child               -> starts a child process (sleep 600) and answers its pid

With $FAIL_START_FILE naming a file that exists, the machine exits at once (cannot start).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import web

MACHINE = os.environ["FLY_MACHINE_ID"]
FAIL_START_FILE = os.environ.get("FAIL_START_FILE")
if FAIL_START_FILE and Path(FAIL_START_FILE).exists():
    print("refusing to start: FAIL_START_FILE exists")
    sys.exit(3)
COUNTER = {"visits": 0}
SOCKETS = {"open": 0, "last_close": None}


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
            "host_env": os.environ.get("HOST"),
            "private_ip": os.environ.get("FLY_PRIVATE_IP"),
            "resolver": os.environ.get("FLYSTICKY_RESOLVER"),
            "pid": os.getpid(),
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
    SOCKETS["open"] += 1
    try:
        await ws.send_str(MACHINE)
        async for message in ws:
            if message.data.startswith("close "):
                await ws.close(code=int(message.data.split()[1]))
                break
            await ws.send_str(f"{MACHINE}:{message.data}")
    finally:
        SOCKETS["open"] -= 1
        SOCKETS["last_close"] = ws.close_code
    return ws


async def websocket_stats(request: web.Request) -> web.Response:
    return web.json_response(SOCKETS)


async def count(request: web.Request) -> web.Response:
    COUNTER["visits"] += 1
    return web.json_response({"machine": MACHINE, "visits": COUNTER["visits"], "pid": os.getpid()})


async def sink(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
    return web.json_response({"machine": MACHINE, "body_size": size})


async def die(request: web.Request) -> web.Response:
    await request.read()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


async def shout(request: web.Request) -> web.StreamResponse:
    print("x" * int(request.query["n"]), flush=True)
    return await describe(request)


async def child(request: web.Request) -> web.Response:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return web.json_response({"pid": process.pid})


app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_route("*", "/echo", describe)
app.router.add_route("*", "/replay", replay)
app.router.add_route("*", "/replay-always", replay)
app.router.add_route("*", "/json-replay", json_replay)
app.router.add_get("/slow", slow)
app.router.add_get("/ws", websocket)
app.router.add_get("/ws-stats", websocket_stats)
app.router.add_get("/count", count)
app.router.add_post("/sink", sink)
app.router.add_post("/die", die)
app.router.add_get("/shout", shout)
app.router.add_get("/child", child)

if __name__ == "__main__":
    web.run_app(
        app, host=os.environ["HOST"], port=int(os.environ["PORT"]), print=None, access_log=None
    )
