"""The plain facts the rules read: a ``Project`` and everything it holds.

Nothing here reads a file or imports an app: ``project.py`` (fly.toml, Dockerfile,
Procfile, the app's syntax tree) and ``probe.py`` (the app's StickyConfig) fill these in,
``rules.py`` reads them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import StickyConfig

#: Fly's process group when fly.toml has no ``[processes]``.
DEFAULT_PROCESS = "app"
#: The key function is asked about this path under each replay-cache ``path_prefix``.
PROBE_SEGMENT = "flysticky-check"


def number(text: str | None) -> int | None:
    """A port or a count written in ASCII digits; None for anything else (``²``, which
    ``isdigit()`` takes and ``int()`` refuses, and digits past ``int()``'s limit too)."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:
        return None


# --- Where a value was read ----------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a value was read, and how a message names that place (its file first:
    "Dockerfile CMD", "fly.toml [env] PORT", "app.py app.run(...)")."""

    file: str
    line: int | None
    name: str

    def __str__(self) -> str:
        return f"{self.name}, line {self.line}" if self.line else self.name


@dataclass(frozen=True)
class EnvValue:
    """An environment variable the machines get: Dockerfile ENV, then fly.toml [env]."""

    value: str
    origin: Origin

    def said(self, name: str) -> str:
        return f"{name}={self.value} from {self.origin}"


def default_said(name: str, default: str) -> str:
    """How a message says that ``name`` is unset, so its default applies."""
    return f"{name} is set nowhere: its default {default}"


class TomlLines:
    """Where each table and key of a fly.toml is: tomllib keeps no line numbers.

    Array tables are counted in file order (the third ``[[services.ports]]`` is index 2,
    whichever service holds it). A dotted key or an inline table has no line of its own:
    then the line of the table's header, else none. The lines inside a multi-line string
    are its value's, never a header or a key."""

    _HEADER = re.compile(r"\s*(\[\[?)([^\[\]#]+)\]\]?\s*(?:#.*)?$")
    _KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self._at: dict[tuple[str, int, str], int] = {}
        seen: dict[str, int] = {}
        table, index = "", 0
        string: str | None = None  # the quotes of the multi-line string the line is in
        for row, line in enumerate(text.splitlines(), 1):
            if string is not None:
                if line.count(string) % 2:
                    string = None
                continue
            header = self._HEADER.match(line)
            if header is not None:
                table = ".".join(part.strip().strip("\"'") for part in header[2].split("."))
                index = 0
                if header[1] == "[[":
                    index = seen[table] = seen.get(table, -1) + 1
                self._at.setdefault((table, index, ""), row)
                continue
            key = self._KEY.match(line)
            if key is not None:
                self._at.setdefault((table, index, key[1].strip("\"'")), row)
            string = next((q for q in ('"""', "'''") if line.count(q) % 2), None)

    def line(self, table: str, key: str = "", index: int = 0) -> int | None:
        return self._at.get((table, index, key)) or self._at.get((table, index, ""))


# --- fly.toml ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    """``[http_service]`` or one ``[[services]]`` entry."""

    data: dict[str, Any]
    table: str
    index: int
    label: str
    http: bool

    @property
    def processes(self) -> list[str] | None:
        value = self.data.get("processes")
        return [str(p) for p in value] if isinstance(value, list) else None

    @property
    def internal_port(self) -> int | None:
        port = self.data.get("internal_port")
        return port if isinstance(port, int) and not isinstance(port, bool) else None


@dataclass(frozen=True)
class CacheEntry:
    """One replay_cache entry of a service."""

    data: dict[str, Any]
    table: str
    index: int
    #: Its service takes HTTP (an ``[[services]]`` entry may be TCP only).
    http: bool

    @property
    def label(self) -> str:
        return f"[[{self.table}]]"

    @property
    def prefix(self) -> str | None:
        prefix = self.data.get("path_prefix")
        return prefix if isinstance(prefix, str) else None

    @property
    def path(self) -> str | None:
        """The path of ``path_prefix``, which may start with a host name."""
        prefix = self.prefix
        if prefix is None:
            return None
        return prefix if prefix.startswith("/") else "/" + prefix.partition("/")[2]

    @property
    def probe(self) -> str | None:
        """The path under ``path_prefix`` the skipper and the key function are asked about."""
        path = self.path
        return None if path is None else path.rstrip("/") + "/" + PROBE_SEGMENT


@dataclass(frozen=True)
class HealthCheck:
    """An HTTP health check that reaches the app, and the line of its ``path``."""

    path: str
    line: int | None

    @property
    def probe(self) -> str:
        """The path the skipper is asked about: the check's, without its query."""
        return self.path.partition("?")[0] or "/"


# --- The commands the machines run, and what they start ----------------------------------


@dataclass(frozen=True)
class Command:
    """A command the machines run: Dockerfile ENTRYPOINT + CMD, a fly.toml process, a
    Procfile line."""

    argv: tuple[str, ...]
    origin: Origin
    #: Its Fly process group; None (a Procfile line): not compared with fly.toml's services.
    process: str | None


@dataclass(frozen=True)
class Bind:
    """An address the app listens on, as far as it can be read (None: cannot tell)."""

    host: str | None
    port: int | None
    said: str  # how the source says it: "--host 0.0.0.0", "uvicorn's default (no --host)"
    origin: Origin


@dataclass(frozen=True)
class Workers:
    """A setting that runs several server processes per machine."""

    said: str
    origin: Origin


@dataclass(frozen=True)
class AppModule:
    """The app's module: its importable name, the directory to put first on sys.path (for
    ``python src/app.py``, ``uvicorn --app-dir src``), its file and its syntax tree."""

    name: str
    directory: Path
    file: str
    tree: ast.Module | None
    attr: str | None = None
    #: The line of its ``StickyConfig(...)``, else of its ``StickySessions(...)``.
    config_line: int | None = None


@dataclass(frozen=True)
class Launch:
    """What a command starts, as far as its words tell."""

    command: Command
    module: AppModule | None
    #: The addresses it listens on; None when they cannot be told.
    binds: tuple[Bind, ...] | None
    workers: tuple[Workers, ...] = ()


# --- The app's StickyConfig, read by importing its module (probe.py) ----------------------


@dataclass(frozen=True)
class ConfigFacts:
    """What the checks need of a StickyConfig: the skipper and the key function are asked in
    the probe subprocess (see PathAnswer), so here only whether there is a skipper."""

    cookie_name: str
    session_header: str | None
    path: str
    owners: str
    forward_large_bodies: bool
    metrics_port: int | None
    metrics_path: str
    has_skipper: bool

    @classmethod
    def of(cls, config: StickyConfig) -> ConfigFacts:
        return cls(
            config.cookie_name,
            config.session_header,
            config.path,
            config.owners,
            config.forward_large_bodies,
            config.metrics_port,
            config.metrics_path,
            config.skipper is not None,
        )


@dataclass(frozen=True)
class PathAnswer:
    """What the app's skipper and key function make of a GET of one path (no cookie)."""

    skipped: bool | None  # None: they could not be asked (``problem`` says why)
    key: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ConfigRead:
    """The app's StickyConfig, as importing its module found it."""

    facts: ConfigFacts
    #: The module global it was found in.
    name: str
    #: The flysticky adapter that installs it ("sanic", "quart", "asgi", "litestar"), or
    #: "config": a bare StickyConfig.
    kind: str
    #: The request object its skipper gets: "sanic", "quart", "starlette", "litestar" (their
    #: Request), "scope" (a plain ASGI app's); None when that cannot be told.
    request: str | None
    #: The answers of its skipper and key function, by path (HealthCheck.probe,
    #: CacheEntry.probe).
    answers: dict[str, PathAnswer]


@dataclass(frozen=True)
class ServesAtImport:
    """The module calls something that may serve at import: it was not imported."""

    call: str  # "uvicorn.run"
    line: int


@dataclass(frozen=True)
class ImportTimedOut:
    """The import did not finish within the timeout: it was ended, with all it started."""

    seconds: float


@dataclass(frozen=True)
class ImportFailed:
    error: str  # "KeyError: 'SECRET'"
    #: The last place in the project's own files the error passed through; else the app's
    #: file, and no line.
    file: str
    line: int | None


@dataclass(frozen=True)
class NoStickyConfig:
    """The module imports, and holds no StickyConfig nor flysticky adapter."""


#: Why the app's StickyConfig was not read.
ConfigUnread = ServesAtImport | ImportTimedOut | ImportFailed | NoStickyConfig


# --- The project --------------------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    """Everything the rules read."""

    root: Path
    fly: dict[str, Any]
    lines: TomlLines
    #: The warnings fly.toml accepts (``# flysticky: accept <id>``).
    accepted: frozenset[str]
    #: The machines' environment: the image's ENV, overridden by fly.toml's [env].
    env: dict[str, EnvValue]
    services: tuple[Service, ...]
    cache_entries: tuple[CacheEntry, ...]
    health_checks: tuple[HealthCheck, ...]
    #: ``[metrics]``: the port and path Fly scrapes (a list of them, as ``[[metrics]]``).
    metrics: tuple[dict[str, Any], ...]
    #: The commands the machines run, those of the processes that serve HTTP first.
    commands: tuple[Command, ...]
    launches: tuple[Launch, ...]
    #: What runs several server processes per machine: options, app.run(...), WEB_CONCURRENCY.
    workers: tuple[Workers, ...]
    #: The app's module: the first one a command runs, else app.py or main.py.
    app: AppModule | None
    #: What importing the app's module gave; None when there is none (or before probe.py).
    probe: ConfigRead | ConfigUnread | None = None

    @property
    def http_services(self) -> list[Service]:
        return [s for s in self.services if s.http]

    @property
    def http_cache_entries(self) -> list[CacheEntry]:
        return [e for e in self.cache_entries if e.http]

    @property
    def questions(self) -> list[str]:
        """The paths to ask the app's skipper and key function about."""
        paths = {h.probe for h in self.health_checks}
        paths.update(e.probe for e in self.cache_entries if e.probe is not None)
        return sorted(paths)

    @property
    def config_read(self) -> ConfigRead | None:
        """The app's StickyConfig as read; None when it was not."""
        return self.probe if isinstance(self.probe, ConfigRead) else None

    @property
    def config(self) -> ConfigFacts:
        """The StickyConfig fly.toml is compared with: the app's, else flysticky's defaults."""
        read = self.config_read
        return read.facts if read is not None else _DEFAULTS


_DEFAULTS = ConfigFacts.of(StickyConfig())
