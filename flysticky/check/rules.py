"""The rules: a ``Project`` of facts in, ``Finding``s out. Nothing here reads a file or
imports the app.

First what kept the app's StickyConfig from being read (``config_not_read``), then the nine
checks, in the order of the README's table; each one's docstring names the Fly rule it
enforces.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..regions import LIVE_REGIONS, RETIRED_REGIONS
from .facts import (
    Bind,
    ConfigRead,
    ImportFailed,
    ImportTimedOut,
    Launch,
    NoStickyConfig,
    PathAnswer,
    Project,
    ServesAtImport,
    Service,
)

Severity = Literal["error", "warning"]

#: Fly's smallest replay-cache ``ttl_seconds``.
MIN_REPLAY_CACHE_TTL = 10


@dataclass(frozen=True)
class Finding:
    """One problem in the project, as ``--json`` prints it."""

    id: str
    severity: Severity
    file: str | None
    line: int | None
    what: str
    why: str
    fix: str


def findings(project: Project) -> list[Finding]:
    """Every finding, in order: why the config was not read, then each check's."""
    found = list(config_not_read(project))
    for check in CHECKS:
        found.extend(check(project))
    return found


def _shown(value: Any) -> str:
    """A fly.toml value as a message quotes it (a TOML date too, which JSON has not)."""
    return json.dumps(value, default=str)


# --- What kept the StickyConfig from being read ---------------------------------------------

_SKIPPED = (
    "so the checks that need the config (health checks, replay-cache state, metrics) were "
    'skipped, and the others used flysticky\'s defaults (cookie "fly-machine-id")'
)
_IMPORTED = (
    "flysticky check reads the StickyConfig by importing the app's module in a "
    "subprocess, never by running its server."
)
_SERVE_IN_MAIN = 'Start the server under `if __name__ == "__main__":`'


def config_not_read(project: Project) -> Iterator[Finding]:
    """Why the app's StickyConfig was not read: no app module, or its import would serve,
    did not finish, failed or found no StickyConfig."""
    app, probe = project.app, project.probe
    if app is None:
        said = ", ".join(str(c.origin) for c in project.commands) or "no command"
        yield Finding(
            "app-not-found",
            "warning",
            None,
            None,
            f"No app module found: {said} runs no module that is in the project, and there "
            "is no app.py or main.py at its root; the checks that need the StickyConfig "
            "were skipped.",
            "flysticky check reads the StickyConfig by importing the app's module, found from "
            "the command the machines run.",
            'Name it in the Dockerfile\'s CMD (CMD ["python", "app.py"], or uvicorn app:app), '
            "or keep it in app.py or main.py at the project's root.",
        )
    elif isinstance(probe, ServesAtImport):
        yield Finding(
            "app-starts-server-at-import",
            "warning",
            app.file,
            probe.line,
            f"{app.file} calls {probe.call}(...) at import (line {probe.line}), which may start "
            f"a server, so flysticky check did not import it, {_SKIPPED}.",
            _IMPORTED,
            f"{_SERVE_IN_MAIN}, as the template's app.py does: importing the module must not "
            "serve.",
        )
    elif isinstance(probe, ImportTimedOut):
        yield Finding(
            "app-import-timeout",
            "warning",
            app.file,
            None,
            f"Importing {app.name} ({app.file}) did not finish within {probe.seconds:g} s, "
            f"{_SKIPPED}.",
            _IMPORTED + " A module that serves or blocks at import never finishes importing.",
            f"{_SERVE_IN_MAIN}, or allow a slow import more time: flysticky check --timeout 30.",
        )
    elif isinstance(probe, ImportFailed):
        yield Finding(
            "app-import-failed",
            "warning",
            probe.file,
            probe.line,
            f"Importing {app.name} ({app.file}) failed: {probe.error}; {_SKIPPED}.",
            _IMPORTED,
            "Run flysticky check with the Python that has the app's requirements installed "
            f'(pip install -r requirements.txt), and make `python -c "import {app.name}"` '
            "work in the project's directory without its server running.",
        )
    elif isinstance(probe, NoStickyConfig):
        yield Finding(
            "config-not-found",
            "warning",
            app.file,
            None,
            f"{app.file} has no flysticky StickySessions (flysticky.sanic, .quart, .asgi, "
            f".litestar) nor StickyConfig at module level, {_SKIPPED}.",
            "Without flysticky on the app, Fly's proxy balances each request on its own, and a "
            "session's in-memory state stays behind on the machine that first served it.",
            "Install it at module level: `sticky = StickySessions(app, StickyConfig(...))` "
            "(Sanic, Quart), `app = StickySessions(app, config)` or "
            "`app.add_middleware(StickySessions, config=config)` (ASGI), "
            "`Litestar(..., plugins=[StickySessions(config)])`.",
        )


# --- How a fix spells a skipper -------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """How a skipper reads the request object it gets: its path, and that a header is not
    there."""

    name: str
    path: str
    lacks: str  # a header's absence, "{}" for the header's name

    def skipper(self, test: str) -> str:
        return f"skipper=lambda {self.name}: {test}"


_REQUEST = _Request("request", "request.path", "{} not in request.headers")
_URL_REQUEST = _Request("request", "request.url.path", "{} not in request.headers")
#: By ConfigRead.request; Starlette's spelling when the request object is not known.
_REQUESTS = {
    "sanic": _REQUEST,
    "quart": _REQUEST,
    "starlette": _URL_REQUEST,
    "litestar": _URL_REQUEST,
    "scope": _Request("scope", 'scope["path"]', 'b{} not in dict(scope["headers"])'),
}


def _request(read: ConfigRead) -> _Request:
    return _REQUESTS.get(read.request or "", _URL_REQUEST)


# --- 1. The replay cache --------------------------------------------------------------------


def _defaults_note(project: Project) -> str:
    return (
        ""
        if project.config_read is not None
        else " (flysticky's default: the app's StickyConfig was not read)"
    )


def _cache_snippet(service: Service, cookie: str) -> str:
    table = (
        "http_service.http_options.replay_cache"
        if service.table == "http_service"
        else "services.ports.http_options.replay_cache"
    )
    return (
        f'[[{table}]]\n  path_prefix = "/"\n  ttl_seconds = 300\n  type = "cookie"\n'
        f"  name = {json.dumps(cookie)}"
    )


def check_replay_cache(project: Project) -> Iterator[Finding]:
    """1. A replay cache keyed on flysticky's cookie (or session header), with Fly's ttl.

    Fly's rule: ``http_options.replay_cache`` remembers, for ``ttl_seconds`` (10 or more),
    which machine a replay went to, filed under a cookie's or a header's value; later
    requests with that value go straight there."""
    services = project.http_services
    if not services:
        return
    config = project.config
    cookie = config.cookie_name
    entries = project.http_cache_entries
    for entry in entries:
        kind, name, ttl = (
            entry.data.get("type"),
            entry.data.get("name"),
            entry.data.get("ttl_seconds"),
        )
        where = project.lines.line(entry.table, "name", entry.index)
        if kind == "cookie" and name != cookie:
            yield Finding(
                "replay-cache-wrong-cookie",
                "error",
                "fly.toml",
                where,
                f'{entry.label} has type = "cookie" and name = {_shown(name)}, but flysticky '
                f"pins sessions with the cookie {json.dumps(cookie)} (StickyConfig.cookie_name"
                f"{_defaults_note(project)}).",
                "Fly's replay cache remembers which machine a replay went to under the named "
                "cookie's value; flysticky replays by its own cookie, so an entry on another "
                "cookie files sessions under a value that does not say where they belong (a "
                "re-pinned session keeps going to its old machine until the entry expires).",
                f"name = {json.dumps(cookie)}",
            )
        elif kind == "header" and (
            config.session_header is None or str(name).lower() != config.session_header
        ):
            header = config.session_header
            yield Finding(
                "replay-cache-wrong-header",
                "error",
                "fly.toml",
                where,
                f'{entry.label} has type = "header" and name = {_shown(name)}, but '
                + (
                    f"StickyConfig.session_header is {json.dumps(header)}."
                    if header
                    else f"StickyConfig.session_header is None{_defaults_note(project)}: flysticky "
                    "routes by no header."
                ),
                "Fly's replay cache files each replay under the named header's value; only "
                "StickyConfig.session_header decides where flysticky replays a request, so an "
                "entry on another header sends requests by a value that says nothing of their "
                "machine.",
                f"name = {json.dumps(header)}"
                if header
                else "Remove this entry, or route by that header: "
                f"StickyConfig(session_header={_shown(name)}).",
            )
        elif kind not in ("cookie", "header"):
            yield Finding(
                "replay-cache-bad-type",
                "error",
                "fly.toml",
                project.lines.line(entry.table, "type", entry.index),
                f"{entry.label} has type = {_shown(kind)}.",
                "Fly's replay cache keys on a cookie or a header value: type is "
                '"cookie" or "header".',
                f'type = "cookie" and name = {json.dumps(cookie)}',
            )
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < MIN_REPLAY_CACHE_TTL:
            yield Finding(
                "replay-cache-ttl-too-short",
                "error",
                "fly.toml",
                project.lines.line(entry.table, "ttl_seconds", entry.index),
                f"{entry.label} has ttl_seconds = {_shown(ttl)}.",
                f"Fly's replay cache keeps an entry at least {MIN_REPLAY_CACHE_TTL} seconds: "
                "ttl_seconds is a whole number of seconds, 10 or more.",
                "ttl_seconds = 300",
            )
    if not any(e.data.get("type") == "cookie" for e in entries):
        service = services[0]
        yield Finding(
            "replay-cache-missing",
            "warning",
            "fly.toml",
            project.lines.line(service.table, index=service.index),
            f"{service.label} has no replay_cache entry keyed on the {json.dumps(cookie)} "
            f"cookie{_defaults_note(project)}.",
            "Sessions still stick, but every request that Fly's proxy lands on another machine "
            "costs a replay hop; with the entry, after a session's first replay the proxy sends "
            "its requests straight to its machine.",
            _cache_snippet(service, cookie),
        )


# --- 2. Replays Fly never caches --------------------------------------------------------------


def check_uncacheable_replays(project: Project) -> Iterator[Finding]:
    """2. Replay-cache entries that only state-carrying replays could fill.

    Fly's rule: a replay whose ``fly-replay`` header carries ``state`` is never cached.
    flysticky sets state on a key replay, and on a session-header replay that also carries
    its cookie."""
    read = project.config_read
    if read is None:
        return
    config = read.facts
    for entry in project.http_cache_entries:
        prefix, path, probe = entry.prefix, entry.path, entry.probe
        if prefix is None or path is None or probe is None:
            continue
        answer = read.answers.get(probe)
        if answer is None or answer.skipped is not False:
            continue
        where = project.lines.line(entry.table, "path_prefix", entry.index)
        if answer.key is not None:
            yield Finding(
                "replay-cache-never-filled",
                "warning",
                "fly.toml",
                where,
                f"{entry.label} path_prefix = {json.dumps(prefix)} covers requests routed by "
                f"StickyConfig.key (GET {probe} has the key {answer.key!r}): flysticky replays "
                "them with state=flysticky-key, and Fly never caches a replay that carries state, "
                "so this entry never fills.",
                "A key's requests go to its owner whoever sends them, and one client visits many "
                "keys: no cookie or header value of a client can stand for one key's machine, so "
                "flysticky keeps key replays out of Fly's replay cache.",
                "Remove this entry, or give it a path_prefix the visitor cookie decides (such as "
                '"/"): key routes need no cache entry.',
            )
        header = config.session_header
        if (
            entry.data.get("type") == "header"
            and header is not None
            and str(entry.data.get("name")).lower() == header
            and _cookie_covers(config.path, path)
        ):
            cookie = config.cookie_name
            request = _request(read)
            skip = request.skipper(
                f"{request.path}.startswith({json.dumps(path)}) and "
                + request.lacks.format(json.dumps(header))
            )
            yield Finding(
                "replay-cache-header-gets-cookie",
                "warning",
                "fly.toml",
                where,
                f"{entry.label} keys on the session header {json.dumps(header)}, but the "
                f"first request of a session under {prefix} (no {header} yet) is stamped with "
                f"the {json.dumps(cookie)} cookie (its Path {config.path} covers it), and a "
                "session replay that also carries that cookie carries state=flysticky-key, which "
                "Fly never caches: for clients that keep cookies this entry never fills.",
                "A replay cached under the session id while the visitor cookie rides along could "
                "also be filed under the cookie's value by a cookie-keyed entry, moving every "
                "session of that machine; flysticky marks such replays with state, and Fly "
                "caches no replay that carries state.",
                f"Keep the cookie off the session's requests: skip the session's first request "
                f"({skip}), or give the cookie a StickyConfig.path that does not cover {path}.",
            )


def _cookie_covers(cookie_path: str, path: str) -> bool:
    """RFC 6265 path-match: a cookie with Path ``cookie_path`` is sent with ``path``."""
    return path == cookie_path or (
        path.startswith(cookie_path)
        and (cookie_path.endswith("/") or path[len(cookie_path)] == "/")
    )


# --- 3. One process per machine ---------------------------------------------------------------


def check_processes(project: Project) -> Iterator[Finding]:
    """3. One server process per machine.

    Fly's rule: a replay names a machine (``fly-replay: instance=<id>``), never a process on
    it; a session's in-memory state is in one process."""
    for workers in project.workers:
        yield Finding(
            "several-processes",
            "error",
            workers.origin.file,
            workers.origin.line,
            f"{workers.origin}: {workers.said} runs several server processes on each machine.",
            "flysticky pins a session to a machine (its cookie holds a machine id), and the "
            "session's state lives in one process's memory: with several processes per machine, "
            "a session's requests land on processes that do not hold it.",
            "One process per machine: no --workers (or --workers 1), no fast=True, no "
            "WEB_CONCURRENCY above 1. To serve more, add machines: fly scale count N.",
        )


# --- 4. internal_port -------------------------------------------------------------------------


def _serving(project: Project) -> Iterator[tuple[Launch, tuple[Bind, ...]]]:
    """The commands of Fly processes whose addresses are known."""
    for launch in project.launches:
        if launch.command.process is not None and launch.binds:
            yield launch, launch.binds


def check_internal_port(project: Project) -> Iterator[Finding]:
    """4. fly.toml's internal_port is where the app listens.

    Fly's rule: the proxy sends a service's requests to ``internal_port`` on each machine
    of the service's processes."""
    known = False
    for launch, binds in _serving(project):
        if any(b.port is None for b in binds):
            continue
        known = True
        ports = {b.port for b in binds if b.port is not None}
        for service in project.http_services:
            internal = service.internal_port
            wanted = service.processes
            if internal is None or internal in ports:
                continue
            if wanted is not None and launch.command.process not in wanted:
                continue
            listening = "; ".join(f"{b.port} ({b.origin}: {b.said})" for b in binds)
            yield Finding(
                "internal-port-mismatch",
                "error",
                "fly.toml",
                project.lines.line(service.table, "internal_port", service.index),
                f"{service.label} internal_port = {internal}, but the app listens on port "
                f"{listening}.",
                "Fly's proxy sends the service's requests to internal_port on each machine "
                "(and flysticky forwards big bodies there over the private network): an app "
                "listening on another port gets none of them.",
                f"internal_port = {sorted(ports)[0]}, or make the app listen on {internal}.",
            )
    if not known:
        yield from _port_env_mismatch(project)


def _port_env_mismatch(project: Project) -> Iterator[Finding]:
    """Where the app's port cannot be read (a socket it makes itself, say), the machines'
    PORT against internal_port: most apps listen on $PORT (the template's do)."""
    port = project.env.get("PORT")
    if port is None or not port.value.strip().isdigit():
        return
    for service in project.http_services:
        internal = service.internal_port
        if internal is None or internal == int(port.value):
            continue
        yield Finding(
            "port-env-mismatch",
            "warning",
            "fly.toml",
            project.lines.line(service.table, "internal_port", service.index),
            f"{service.label} internal_port = {internal}, but the machines get "
            f"{port.said('PORT')}.",
            "Fly's proxy sends the service's requests to internal_port on each machine; an app "
            "that listens on $PORT, as most do, gets none of them. Where the app listens could "
            "not be read, so this is a warning.",
            f'internal_port = {port.value}, or PORT = "{internal}" in [env].',
        )


# --- 5. IPv6 ------------------------------------------------------------------------------------

#: Hosts a server can listen on that Fly's private network (IPv6) reaches.
_IPV6_HOSTS = frozenset({"::", "[::]", "fly-local-6pn"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def check_ipv6(project: Project) -> Iterator[Finding]:
    """5. The app reachable over 6PN (IPv6) when flysticky forwards bodies there.

    Fly's rule: the private network between machines (6PN, ``fly-local-6pn``) is IPv6 only;
    Fly's proxy itself reaches the app on any address but loopback."""
    if not project.config.forward_large_bodies:
        return
    ports = (s.internal_port for s in project.http_services if s.internal_port is not None)
    port = next(ports, 8080)
    for _, binds in _serving(project):
        hosts = [b.host for b in binds]
        if None in hosts or any(
            h in _IPV6_HOSTS or (":" in str(h) and h not in _LOOPBACK) for h in hosts
        ):
            continue
        bind = binds[0]
        loopback = (
            " (loopback: Fly's proxy cannot reach it either)" if bind.host in _LOOPBACK else ""
        )
        yield Finding(
            "not-listening-on-ipv6",
            "error",
            bind.origin.file,
            bind.origin.line,
            f"{bind.origin.name} listens on {bind.host} only ({bind.said}){loopback}, on no "
            "IPv6 address that Fly's private network reaches.",
            "flysticky forwards a body too big to replay (over 1 MiB) to its machine over Fly's "
            "private network, which is IPv6 only (StickyConfig.forward_large_bodies, on by "
            "default): an app not listening on IPv6 refuses those forwards, and each such request "
            "is served on a machine that does not hold its session.",
            f'Listen on "::" (--host ::, --bind [::]:{port}, host="::"), or on one dual-stack '
            "socket for IPv4 and IPv6 (the template's page.listening_socket()); or, if big bodies "
            "may be served where they land, StickyConfig(forward_large_bodies=False).",
        )


# --- 6. Autostop --------------------------------------------------------------------------------


def check_autostop(project: Project) -> Iterator[Finding]:
    """6. Autostop "stop" loses the memory sessions live in, unless the project says so:
    StickyConfig(owners="started") (built for stopped machines) or an accept comment.

    Fly's rule: ``auto_stop_machines = "stop"`` (or ``true``) stops an idle machine, and a
    stopped machine starts again with empty memory; ``"suspend"`` keeps it."""
    if project.config_read is not None and project.config.owners == "started":
        return
    for service in project.services:
        value = service.data.get("auto_stop_machines")
        if value is True or value == "stop":
            yield Finding(
                "autostop-loses-sessions",
                "warning",
                "fly.toml",
                project.lines.line(service.table, "auto_stop_machines", service.index),
                f"{service.label} auto_stop_machines = {json.dumps(value)}: an idle machine is "
                "stopped, and the sessions pinned to it lose their in-memory state.",
                "A stopped machine's memory is gone: Fly's proxy starts it again for the next "
                'request its cookie names, with every session it held empty. "suspend" keeps '
                "the memory (machines of at most 2 GB, no swap, no GPU).",
                'auto_stop_machines = "suspend" (or "off"). If losing that state is fine, say so: '
                'StickyConfig(owners="started"), or the comment '
                "`# flysticky: accept autostop-loses-sessions` in fly.toml.",
            )


# --- 7. Regions ---------------------------------------------------------------------------------


def check_regions(project: Project) -> Iterator[Finding]:
    """7. Regions that exist: primary_region and [env] PRIMARY_REGION.

    Fly's rule: machines are created only in live regions; retired codes are refused or
    mapped to a neighbour."""
    primary_line = project.lines.line("", "primary_region")
    candidates = [("primary_region", project.fly.get("primary_region"), "fly.toml", primary_line)]
    env = project.env.get("PRIMARY_REGION")
    if env is not None:
        candidates.append(("PRIMARY_REGION", env.value, env.origin.file, env.origin.line))
    for name, code, file, line in candidates:
        if not isinstance(code, str) or code.lower() in LIVE_REGIONS:
            continue
        replacement = RETIRED_REGIONS.get(code.lower())
        if replacement is not None:
            yield Finding(
                "region-retired",
                "error",
                file,
                line,
                f"{name} = {json.dumps(code)} is a retired Fly.io region.",
                "Fly creates no machines in a retired region (flyctl silently maps some to a "
                "neighbour, so machines land where fly.toml does not say).",
                f"{name} = {json.dumps(replacement)} (the nearest live region)",
            )
        else:
            yield Finding(
                "region-unknown",
                "error",
                file,
                line,
                f"{name} = {json.dumps(code)} is not a Fly.io region.",
                "Fly creates machines only in its live regions.",
                f"{name} = one of {', '.join(sorted(LIVE_REGIONS))}",
            )


# --- 8. Health checks ---------------------------------------------------------------------------


def check_health_checks(project: Project) -> Iterator[Finding]:
    """8. Health checks skipped by the skipper (evaluated on the framework's request).

    Fly's rule: each machine's health checks go to that machine, with no cookie, every few
    seconds."""
    read = project.config_read
    if read is None:
        return
    request = _request(read)
    for health in project.health_checks:
        path = health.probe
        answer = read.answers.get(path, PathAnswer(None, problem="it was not asked"))
        skip = request.skipper(f"{request.path} == {json.dumps(path)}")
        if answer.skipped is None:
            yield Finding(
                "health-check-unevaluated",
                "warning",
                "fly.toml",
                health.line,
                f"Whether StickyConfig's skipper skips the health check on {health.path} cannot "
                f"be told: {answer.problem}.",
                "flysticky check asks the skipper with the framework's own request for a GET of "
                "the path; without an answer it does not guess.",
                f"Make the skipper answer for any request of the app ({skip}), or check it by "
                "hand: a health check must be skipped.",
            )
        elif answer.skipped:
            continue
        elif answer.key is not None:
            yield Finding(
                "health-check-routed-away",
                "error",
                "fly.toml",
                health.line,
                f"The health check on {health.path} is not skipped, and StickyConfig.key gives "
                f"it the key {answer.key!r}: it is replayed to that key's owner.",
                "Fly checks each machine on its own; a check replayed to another machine tests "
                "that machine instead (and a check carries no cookie, so it is stamped too).",
                f"Skip it: {skip}, or have the key function return None for it.",
            )
        else:
            yield Finding(
                "health-check-not-skipped",
                "warning",
                "fly.toml",
                health.line,
                f"The health check on {health.path} is not skipped by StickyConfig's skipper"
                + ("" if read.facts.has_skipper else " (there is none)")
                + ".",
                "Fly's health checks carry no cookie: each one is stamped (a new Set-Cookie, "
                "counted as a new session), every few seconds on every machine.",
                skip,
            )


# --- 9. Metrics ---------------------------------------------------------------------------------


def check_metrics(project: Project) -> Iterator[Finding]:
    """9. fly.toml's [metrics] and StickyConfig.metrics_port/metrics_path agree.

    Fly's rule: ``[metrics]`` names the one port and path Fly scrapes on each machine."""
    read, app = project.config_read, project.app
    if read is None or app is None:
        return
    config = read.facts
    file, line = app.file, app.config_line
    scraped = project.metrics
    metrics_line = project.lines.line("metrics")
    internal = {s.internal_port for s in project.http_services}
    port, path = config.metrics_port, config.metrics_path
    if port is not None and port in internal:
        yield Finding(
            "metrics-port-is-app-port",
            "error",
            file,
            line,
            f"StickyConfig.metrics_port = {port} is the app's internal_port.",
            "flysticky serves its metrics on a port of its own; the app's port is the app's, "
            "so one of the two cannot listen.",
            f"metrics_port=9091 (and [metrics] port = 9091 in fly.toml), or any port but {port}.",
        )
    if not scraped and port is None:
        return
    if not scraped:
        yield Finding(
            "metrics-not-scraped",
            "warning",
            file,
            line,
            f"StickyConfig.metrics_port = {port}, but fly.toml has no [metrics].",
            "Fly scrapes Prometheus metrics only from the port and path [metrics] names: "
            "flysticky's metrics are served and never collected.",
            f"[metrics]\n  port = {port}\n  path = {json.dumps(path)}",
        )
    elif port is None:
        yield Finding(
            "metrics-not-served",
            "warning",
            "fly.toml",
            metrics_line,
            "fly.toml has [metrics], but StickyConfig.metrics_port is None: flysticky serves "
            "no metrics.",
            "Fly scrapes the port and path [metrics] names on each machine; flysticky's replays, "
            "re-pins and replay-cache hits are there only with metrics_port set.",
            f"StickyConfig(metrics_port={scraped[0].get('port', 9091)}) (with "
            "prometheus-client: pip install 'flysticky[metrics]'); if [metrics] is for your "
            "own exporter, accept this with `# flysticky: accept metrics-not-served` in fly.toml.",
        )
    elif not any(t.get("port") == port and t.get("path", "/metrics") == path for t in scraped):
        table = scraped[0]
        yield Finding(
            "metrics-mismatch",
            "error",
            "fly.toml",
            metrics_line,
            f"[metrics] port = {_shown(table.get('port'))}, path = "
            f"{_shown(table.get('path', '/metrics'))}, but flysticky serves its metrics on "
            f"port {port}, path {json.dumps(path)} (StickyConfig.metrics_port, metrics_path).",
            "Fly scrapes exactly the port and path [metrics] names: anywhere else, it scrapes "
            "nothing.",
            f"[metrics]\n  port = {port}\n  path = {json.dumps(path)}",
        )


CHECKS: tuple[Callable[[Project], Iterator[Finding]], ...] = (
    check_replay_cache,
    check_uncacheable_replays,
    check_processes,
    check_internal_port,
    check_ipv6,
    check_autostop,
    check_regions,
    check_health_checks,
    check_metrics,
)
