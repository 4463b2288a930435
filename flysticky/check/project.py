"""Reading a project into a ``Project`` of plain facts: fly.toml (with its line numbers), the
Dockerfile and Procfile (``commands.py``), and the app's module without running it
(``source.py``). Its StickyConfig is read by importing the module: ``probe.py``."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .commands import commands as read_commands
from .commands import launch, read_dockerfile
from .facts import (
    DEFAULT_PROCESS,
    AppModule,
    CacheEntry,
    EnvValue,
    HealthCheck,
    Launch,
    Origin,
    Project,
    Service,
    TomlLines,
    Workers,
    number,
)
from .source import module_workers, read_module

#: The modules tried when no command names one, as Fly's Python launchers look for them.
FALLBACK_MODULES = ("app", "main")
_ACCEPT = re.compile(r"#\s*flysticky:\s*accept\b([^#\n]*)")


class UsageError(Exception):
    """PATH cannot be checked at all; the message says why and what to give instead."""


def read_project(root: Path) -> Project:
    """Everything the rules read from the project at ``root`` but the app's StickyConfig;
    UsageError when it is not one (no fly.toml, or a fly.toml that is not TOML)."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory; give the directory of a Fly project")
    fly_path = root / "fly.toml"
    if not fly_path.is_file():
        raise UsageError(
            f"{root}: no fly.toml here. Give the directory of a Fly project (flysticky check "
            "path/to/project), or write one with `fly launch --no-deploy` or `flysticky new`"
        )
    text = _read(fly_path, errors="strict")
    try:
        fly = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{fly_path}: not valid TOML: {error}") from None
    except RecursionError:
        raise UsageError(f"{fly_path}: nested too deeply to read") from None
    lines = TomlLines(text)
    build = fly.get("build")
    dockerfile = str(
        build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    )
    stage = None
    if (root / dockerfile).is_file():
        stage = read_dockerfile(_read(root / dockerfile), dockerfile)
    procfile = _read(root / "Procfile") if (root / "Procfile").is_file() else None
    # At run time fly.toml's [env] overrides the image's ENV.
    env = dict(stage.env) if stage is not None else {}
    fly_env = fly.get("env")
    for name, value in fly_env.items() if isinstance(fly_env, dict) else ():
        env[name] = EnvValue(
            str(value), Origin("fly.toml", lines.line("env", name), f"fly.toml [env] {name}")
        )
    commands = read_commands(fly, lines, stage, dockerfile, procfile)
    services = _services(fly)
    served = {p for s in services if s.http for p in (s.processes or [DEFAULT_PROCESS])}
    # The commands of the processes that serve HTTP first: the app's module is theirs.
    commands.sort(key=lambda c: c.process not in served)
    launches = [found for c in commands if (found := launch(c, root, env)) is not None]
    app = next((found.module for found in launches if found.module is not None), None)
    if app is None:
        for name in FALLBACK_MODULES:
            app = read_module(root, root, name, None)
            if app is not None:
                break
    modules = {m.file: m for m in [app, *(found.module for found in launches)] if m is not None}
    return Project(
        root=root,
        fly=fly,
        lines=lines,
        accepted=_accepted(text),
        env=env,
        services=tuple(services),
        cache_entries=tuple(_cache_entries(services)),
        health_checks=tuple(_health_checks(fly, lines, services)),
        metrics=tuple(table for _, table in _tables(fly.get("metrics"))),
        commands=tuple(commands),
        launches=tuple(launches),
        workers=tuple(_workers(launches, modules.values(), env)),
        app=app,
    )


def _read(path: Path, errors: str = "replace") -> str:
    """A file's text; UsageError when it cannot be read (its path and why)."""
    try:
        return path.read_text(errors=errors)
    except OSError as error:
        raise UsageError(f"{path}: cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError as error:  # fly.toml, which TOML wants in UTF-8
        raise UsageError(f"{path}: not valid TOML: {error}") from None


def _tables(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """The tables of a TOML array of tables, with their places (one ``[x]`` counts too)."""
    if isinstance(value, dict):
        return [(0, value)]
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]
    return []


def _services(fly: dict[str, Any]) -> list[Service]:
    found = []
    http_service = fly.get("http_service")
    if isinstance(http_service, dict):
        found.append(Service(http_service, "http_service", 0, "[http_service]", True))
    for i, service in _tables(fly.get("services")):
        handlers = [
            handler
            for _, port in _tables(service.get("ports"))
            if isinstance(port.get("handlers"), list)
            for handler in port["handlers"]
        ]
        found.append(Service(service, "services", i, f"[[services]] #{i + 1}", "http" in handlers))
    return found


def _cache_entries(services: list[Service]) -> list[CacheEntry]:
    entries: list[CacheEntry] = []
    in_services = 0  # [[services.ports.http_options.replay_cache]] are counted in file order
    for service in services:
        if service.table == "http_service":
            table = "http_service.http_options.replay_cache"
            for i, entry in _replay_cache(service.data):
                entries.append(CacheEntry(entry, table, i, service.http))
            continue
        table = "services.ports.http_options.replay_cache"
        for _, port in _tables(service.data.get("ports")):
            for _, entry in _replay_cache(port):
                entries.append(CacheEntry(entry, table, in_services, service.http))
                in_services += 1
    return entries


def _replay_cache(holder: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The replay_cache entries of ``[http_service]``'s or a port's ``http_options``."""
    options = holder.get("http_options")
    return _tables(options.get("replay_cache")) if isinstance(options, dict) else []


def _health_checks(
    fly: dict[str, Any], lines: TomlLines, services: list[Service]
) -> list[HealthCheck]:
    """HTTP checks that reach the app: ``[[http_service.checks]]``, ``[[services.http_checks]]``
    and top-level ``[checks.<name>]`` of type http on a service's port."""
    found: list[tuple[dict[str, Any], int | None]] = []
    in_services = 0
    for service in services:
        if service.table == "http_service":
            for i, check in _tables(service.data.get("checks")):
                found.append((check, lines.line("http_service.checks", "path", i)))
            continue
        for _, check in _tables(service.data.get("http_checks")):
            found.append((check, lines.line("services.http_checks", "path", in_services)))
            in_services += 1
    app_ports = {s.internal_port for s in services if s.http} - {None}
    checks = fly.get("checks")
    for name, check in checks.items() if isinstance(checks, dict) else ():
        # A machine check on another port (a metrics server, say) never meets flysticky.
        if (
            isinstance(check, dict)
            and check.get("type") == "http"
            and isinstance(check.get("port"), int)
            and check["port"] in app_ports
        ):
            found.append((check, lines.line(f"checks.{name}", "path")))
    return [
        HealthCheck(check["path"], line)
        for check, line in found
        if isinstance(check.get("path"), str) and check["path"].startswith("/")
    ]


def _accepted(text: str) -> frozenset[str]:
    return frozenset(
        word
        for match in _ACCEPT.finditer(text)
        for word in re.split(r"[\s,]+", match[1])
        if re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", word)
    )


def _workers(
    launches: list[Launch], modules: Iterable[AppModule], env: dict[str, EnvValue]
) -> list[Workers]:
    """What runs several server processes per machine: a command's options, an app module's
    ``app.run(workers=...)``, ``WEB_CONCURRENCY``."""
    found = [w for found in launches for w in found.workers]
    found += [w for module in modules for w in module_workers(module, env)]
    concurrency = env.get("WEB_CONCURRENCY")
    if concurrency is not None and (number(concurrency.value.strip()) or 0) > 1:
        found.append(Workers(f"WEB_CONCURRENCY={concurrency.value}", concurrency.origin))
    return found
