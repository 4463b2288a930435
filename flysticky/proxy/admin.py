"""The emulator's admin API, ``/.fly-emulator/...``: list, add and change machines, and
read the fleet's metrics as Fly's Prometheus would hold them (``/metrics``).

Only for the person at this computer: the peer must be loopback, the Host a loopback
name (a DNS-rebinding page has its own), and nothing a web page can send cross-site
is obeyed (an ``Origin`` other than the proxy's own, ``Sec-Fetch-Site: cross-site``,
or a POST with a content type a page may send without asking, body or not).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .machines import Machine, MachineError
from .metrics import CONTENT_TYPE, exposition, scrape_fleet

if TYPE_CHECKING:
    from .emulator import Emulator

ADMIN_PREFIX = "/.fly-emulator"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
#: The CORS-safelisted Content-Types (Fetch standard): a page sends a POST with one of
#: them, or none, cross-site without a preflight. A bare POST (no type, no body) is
#: allowed for curl; a page's bodiless fetch has the same shape but is caught by Origin.
_SIMPLE_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
)


def _loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def own_origins(url: str, port: int) -> frozenset[str]:
    """The proxy's own origin however a browser here names it: its URL, and the
    loopback names with its port (a page opened via localhost is as much its own)."""
    return frozenset(
        {url, *(f"http://{host}:{port}" for host in ("127.0.0.1", "localhost", "[::1]"))}
    )


def refusal(request: web.Request, origins: frozenset[str]) -> str | None:
    """Why this request may not drive the admin API, or None; ``origins``: own_origins()."""
    if not _loopback(request.remote):
        return f"the admin API answers only this computer, not {request.remote}"
    host = (request.url.host or "").lower()
    if host not in _LOOPBACK_NAMES and not _loopback(host):
        return f"Host {request.host!r} is not this computer"
    origin = request.headers.get("origin")
    if origin is not None and origin not in origins:
        return f"Origin {origin!r} is another site"
    fetch_site = request.headers.get("sec-fetch-site", "none")
    if fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site {fetch_site!r}: only same-origin requests"
    if request.method == "POST":
        kind = request.content_type if "content-type" in request.headers else None
        if kind in _SIMPLE_TYPES or (request.can_read_body and kind != "application/json"):
            sent = request.headers.get("content-type", "(none)")
            return f"Content-Type {sent!r}: send application/json (or no body and no type)"
    return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_admin_routes(app: web.Application, emulator: Emulator) -> None:
    def guarded(
        handler: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def checked(request: web.Request) -> web.Response:
            why = refusal(request, own_origins(emulator.url, emulator.port))
            if why is not None:
                return _error(403, why)
            return await handler(request)

        return checked

    async def machines(request: web.Request) -> web.Response:
        return web.json_response(emulator.describe())

    async def add(request: web.Request) -> web.Response:
        region = request.query.get("region")
        if request.can_read_body:
            try:
                body: Any = json.loads(await request.read())
            except ValueError as error:
                return _error(400, f"the body is not JSON: {error}")
            if not isinstance(body, dict) or not isinstance(body.get("region", ""), str):
                return _error(400, 'expected {"region": "iad"} or no body')
            region = body.get("region") or region
        try:
            machine = await emulator.fleet.add(region or None)
        except ValueError as error:
            return _error(400, str(error))
        except MachineError as error:
            return _error(502, str(error))
        return web.json_response({"id": machine.id, "region": machine.region}, status=201)

    actions: dict[str, Callable[[Machine], Awaitable[None]]] = {
        "start": emulator.fleet.start,
        "resume": emulator.fleet.start,
        "stop": emulator.fleet.stop,
        "suspend": emulator.fleet.suspend,
        "crash": emulator.fleet.kill,
        "kill": emulator.fleet.kill,
        "restart": emulator.fleet.restart,
        "destroy": emulator.destroy,
    }

    async def act(request: web.Request) -> web.Response:
        machine_id, action = request.match_info["id"], request.match_info["action"]
        machine = emulator.fleet.get(machine_id)
        if machine is None:
            return _error(404, f"no machine {machine_id!r}")
        if action not in actions:
            return _error(404, f"action {action!r}: one of {', '.join(sorted(actions))}")
        try:
            await actions[action](machine)
        except MachineError as error:
            return _error(409, str(error))
        return web.json_response({"id": machine.id, "state": machine.facts().state})

    async def metrics(request: web.Request) -> web.Response:
        scrapes = await scrape_fleet(emulator.client, emulator.fleet)
        body = exposition(emulator.fleet, scrapes, emulator.stats.proxy_errors)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get(ADMIN_PREFIX + "/metrics", guarded(metrics))
    app.router.add_get(ADMIN_PREFIX + "/machines", guarded(machines))
    app.router.add_post(ADMIN_PREFIX + "/machines", guarded(add))
    app.router.add_post(ADMIN_PREFIX + "/machines/{id}/{action}", guarded(act))
