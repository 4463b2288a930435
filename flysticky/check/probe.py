"""The app's StickyConfig, read by importing the app's module in a subprocess.

The subprocess (``PROBE_CODE``, which runs ``probe_main``) imports the module with
``FLY_MACHINE_ID`` unset (off Fly, flysticky does nothing at import: no discovery, no
metrics), finds the StickyConfig it installs, and asks its skipper and key function about
each path with the framework's own request object for a GET of it. It never runs the app's
server: a module that may serve at import is not imported at all, and the subprocess, with
all it started, is ended at the timeout and when it is done.

Framework internals touched (here only; the version matrix runs tests/test_check.py on
Sanic 23.12 to 25.12 and Quart 0.19.9 to 0.23): ``sanic.compat.Header`` builds a Sanic
request's headers, and Werkzeug's ``LocalProxy._get_current_object`` gives Quart's request
inside a test request context (the Quart adapter reads its proxies the same way).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import StickyConfig
from .facts import (
    AppModule,
    ConfigFacts,
    ConfigRead,
    ConfigUnread,
    ImportFailed,
    ImportTimedOut,
    NoStickyConfig,
    PathAnswer,
    ServesAtImport,
)
from .source import starts_at_import

#: The Host header of the requests the skipper and the key function are asked about.
PROBE_HOST = "flysticky-check.fly.dev"
#: Off Fly (no machine id) flysticky does nothing at import: no discovery, no metrics.
FLY_IDENTITY = ("FLY_MACHINE_ID", "FLY_ALLOC_ID")
#: The code the probe subprocess runs (``probe_main`` below, with its spec file as argv[1]).
PROBE_CODE = "import sys\nfrom flysticky.check.probe import probe_main\nprobe_main(sys.argv[1])"
#: The most of the subprocess's stderr read back, for its last line.
_STDERR_TAIL = 64 * 1024


def read_config(
    app: AppModule, root: Path, paths: list[str], timeout: float
) -> ConfigRead | ConfigUnread:
    """Import ``app`` in a subprocess and read its StickyConfig, with the answers of its
    skipper and key function for ``paths``; or why it could not be read."""
    if app.tree is not None:
        call = starts_at_import(app.tree)
        if call is not None:
            return ServesAtImport(_spelled(call.func), call.lineno)
    # A process that escaped the group (setsid) may still write there: its files may stay.
    with tempfile.TemporaryDirectory(
        prefix="flysticky-check-", ignore_cleanup_errors=True
    ) as scratch:
        spec_file, out, errors = (Path(scratch) / n for n in ("spec.json", "answer.json", "err"))
        spec = {
            "root": str(root),
            "directory": str(app.directory),
            "module": app.name,
            "attr": app.attr,
            "paths": paths,  # in a file, not argv: a fly.toml may name thousands
            "out": str(out),
        }
        spec_file.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k not in FLY_IDENTITY}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the project
        with errors.open("wb") as stderr:
            process = subprocess.Popen(
                # -P: flysticky is imported before the project is on sys.path, so that a
                # project's own json.py or flysticky/ cannot stand in for it.
                [sys.executable, "-P", "-c", PROBE_CODE, str(spec_file)],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                # Files, not pipes: a process the app forks at import could hold a pipe open
                # (and the wait for its end) past the timeout.
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: all it started is ended
            )
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return ImportTimedOut(timeout)
        finally:
            # Everything still in its group (a server forked or spawned at import) ends here.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        answer = _answer(out)
        last_words = _last_line(errors)
    if "error" in answer or not answer:
        error = answer.get("error") or {
            "type": _ended(process.returncode),
            "message": last_words or "no output",
        }
        return ImportFailed(
            f"{error['type']}: {error['message']}", error.get("file") or app.file, error.get("line")
        )
    if answer.get("config") is None:
        return NoStickyConfig()
    return ConfigRead(
        ConfigFacts(**answer["config"]),
        answer["found"],
        answer["kind"],
        answer["request"],
        {path: PathAnswer(**a) for path, a in answer["answers"].items()},
    )


def _spelled(func: ast.expr) -> str:
    try:
        return ast.unparse(func)
    except RecursionError:  # a.b.c.(thousands more).run
        return f"(...).{func.attr}" if isinstance(func, ast.Attribute) else "(...)"


def _answer(out: Path) -> dict[str, Any]:
    try:
        answer = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _last_line(path: Path) -> str | None:
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - _STDERR_TAIL))
        lines = file.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else None


def _ended(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


# --- In the subprocess ----------------------------------------------------------------------


def probe_main(spec_file: str) -> None:
    """The probe subprocess: import the app's module, find its StickyConfig, ask its skipper
    and key function about each path; the answer goes to ``spec["out"]`` as JSON. It ends
    with ``os._exit``: the app may have started threads at import, or closed sys.stdout."""
    pid = os.getpid()
    status = 1
    try:
        spec = json.loads(Path(spec_file).read_text())
        answer = _probe(spec)
        if os.getpid() == pid:  # a process the app forked at import gets here too: not it
            out = Path(spec["out"])
            partial = out.with_name(out.name + ".partial")
            partial.write_text(json.dumps(answer))
            partial.replace(out)  # whole or not at all
        status = 0
    except BaseException:
        with contextlib.suppress(Exception):  # the parent reports its last line
            os.write(2, traceback.format_exc().encode(errors="replace"))
    finally:
        os._exit(status)


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    # As a server would have it: the module's directory first, then the project's.
    sys.path[:0] = [spec["directory"], spec["root"]]
    try:
        module = importlib.import_module(spec["module"])
    except BaseException as error:  # SystemExit too: a finding, never a traceback
        return {"error": _import_error(error, Path(spec["root"]))}
    found = _find_config(module, spec["attr"])
    if found is None:
        return {"config": None}
    config, kind, owner, name = found
    return {
        "config": asdict(ConfigFacts.of(config)),
        "found": name,
        "kind": kind,
        "request": _request_type(kind, owner),
        "answers": {
            path: asdict(a) for path, a in _ask(config, kind, owner, spec["paths"]).items()
        },
    }


def _import_error(error: BaseException, root: Path) -> dict[str, Any]:
    """The error, and the last place in the project's own files it passed through."""
    file, line = None, None
    places = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
    if isinstance(error, SyntaxError) and error.filename:
        places.append((error.filename, error.lineno))
    for filename, lineno in places:
        path = Path(filename)  # "<frozen os>" and the like are not files
        if path.is_absolute() and path.is_relative_to(root) and "site-packages" not in path.parts:
            file, line = path.relative_to(root).as_posix(), lineno
    return {"type": type(error).__name__, "message": str(error), "file": file, "line": line}


def _adapter(value: object) -> str | None:
    """Which flysticky adapter ``value`` is an instance of ("sanic", "quart", "asgi",
    "litestar"); None for anything else. Read from its class, so that no adapter (and no
    framework) is imported to ask."""
    kind = type(value)
    if kind.__name__ == "StickySessions" and kind.__module__.startswith("flysticky."):
        return kind.__module__.removeprefix("flysticky.")
    return None


def _find_config(module: Any, attr: str | None) -> tuple[StickyConfig, str, Any, str] | None:
    """The StickyConfig the module installs: (config, adapter, the app or wrapped app it
    decides for, the global that holds it). flysticky's own objects first, then apps that
    hold one, then a bare StickyConfig (whose request type is a guess); among equals, the
    command's ``attr`` first, then the module's order."""
    names = [attr] if attr else []
    names += [n for n in vars(module) if not n.startswith("_")]
    found = []
    seen: set[int] = set()
    for order, name in enumerate(names):
        # Any object of the app's may refuse to be looked at (a context proxy, a property
        # that raises, a __getattr__ that exits): it is passed over.
        try:
            value = getattr(module, name, None)
            if id(value) in seen or inspect.ismodule(value) or inspect.isclass(value):
                continue
            seen.add(id(value))
            hit = _sticky_in(value, module)
            if hit is not None:
                rank = 0 if _adapter(value) else 2 if isinstance(value, StickyConfig) else 1
                found.append((rank, order, (*hit, name)))
        except BaseException:
            continue
    return min(found, key=lambda each: each[:2])[2] if found else None


def _sticky_in(value: Any, module: Any) -> tuple[StickyConfig, str, Any] | None:
    kind = _adapter(value)
    if kind == "asgi":
        return value.config, kind, value.app
    if kind is not None:
        return value.config, kind, _app_with(module, value)
    if isinstance(value, StickyConfig):
        apps = _framework_apps(module)
        if len(apps) == 1:  # the app it is for, when the module has exactly one
            kind, app = apps[0]
            return value, kind, app
        return value, "config", None
    plugin = getattr(getattr(value, "ctx", None), "flysticky", None)  # Sanic's init_app
    if plugin is not None and _adapter(plugin) == "sanic":
        return plugin.config, "sanic", value
    extensions = getattr(value, "extensions", None)  # Quart's init_app
    if isinstance(extensions, dict) and _adapter(extensions.get("flysticky")) == "quart":
        return extensions["flysticky"].config, "quart", value
    for entry in getattr(value, "user_middleware", None) or ():  # Starlette's add_middleware
        cls = getattr(entry, "cls", None)
        if isinstance(cls, type) and cls.__module__ == "flysticky.asgi":
            config = entry.kwargs.get("config") or (entry.args[0] if entry.args else None)
            return config or StickyConfig(), "asgi", value
    if type(value).__module__.startswith("litestar"):
        for plugin in value.plugins:
            if _adapter(plugin) == "litestar":
                return plugin.config, "litestar", value
    wrapped, depth = value, 0  # flysticky's middleware inside other ASGI wrappers
    while wrapped is not None and depth < 32:
        if _adapter(wrapped) == "asgi":
            return wrapped.config, "asgi", wrapped.app
        wrapped = getattr(wrapped, "app", None) or getattr(wrapped, "other_asgi_app", None)
        depth += 1
    return None


#: The frameworks whose request objects the probe can make, by the app's class.
_FRAMEWORKS = {"Sanic": "sanic", "Quart": "quart", "Starlette": "asgi", "Litestar": "litestar"}


def _framework_apps(module: Any) -> list[tuple[str, Any]]:
    apps = []
    for value in vars(module).values():
        for cls in type(value).__mro__:
            if cls.__name__ in _FRAMEWORKS and cls.__module__.split(".")[0] in (
                "sanic",
                "quart",
                "starlette",
                "litestar",
            ):
                apps.append((_FRAMEWORKS[cls.__name__], value))
                break
    return apps


def _app_with(module: Any, plugin: Any) -> Any:
    """The app a Sanic, Quart or Litestar StickySessions is installed on; else the module's
    one app of that framework (installed by a factory, say); else None."""
    apps = [app for kind, app in _framework_apps(module) if kind == _adapter(plugin)]
    for app in apps:
        found = _sticky_in(app, module)
        if found is not None and found[0] is plugin.config:
            return app
    return apps[0] if len(apps) == 1 else None


# --- Asking the skipper and the key function -----------------------------------------------


def _scope(path: str, app: Any = None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", PROBE_HOST.encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    if app is not None:
        scope["app"] = app
    return scope


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _no_send(_message: Any) -> None:
    return None


def _asgi_request(kind: str, owner: Any) -> Callable[[str], Any]:
    """The request object flysticky's ASGI middleware (``kind`` "asgi") or Litestar plugin
    hands the skipper for a GET of a path."""
    # Private names of flysticky.asgi, used here and nowhere else in the check: they are how
    # the middleware picks the request object (Starlette's, Litestar's or the scope) its
    # skipper gets, and the probe must hand the skipper that same object. Imported here, not
    # at the top: flysticky.asgi brings aiohttp, which the rest of the check never needs.
    from ..asgi import _connection_for, _litestar_connection

    if kind == "litestar":
        return lambda path: _litestar_connection(_scope(path, owner), _no_receive, _no_send)
    connection = _connection_for(owner)
    return lambda path: connection(_scope(path), _no_receive, _no_send)


def _request_maker(kind: str, owner: Any) -> Callable[[str], Any] | str:
    """A function making the request object ``kind``'s skipper gets for a GET of a path;
    or why none can be made."""
    if kind in ("asgi", "litestar"):
        return _asgi_request(kind, owner)
    if kind == "sanic" and owner is not None:
        from sanic.compat import Header

        cls = owner.request_class
        return lambda path: cls(
            path.encode(), Header({"host": PROBE_HOST}), "1.1", "GET", None, owner
        )
    if kind in ("sanic", "quart"):
        return f"no {kind.title()} app with this StickySessions installed is at module level"
    return (
        "the StickyConfig is a module-level value, and no one Sanic, Quart, Starlette or "
        "Litestar app beside it says which request object its skipper gets"
    )


def _request_type(kind: str, owner: Any) -> str | None:
    """Which request object the skipper gets: "sanic", "quart", "litestar", "starlette"
    (their Request), "scope" (a plain ASGI app's); None when that cannot be told."""
    if kind in ("sanic", "quart", "litestar"):
        return kind
    if kind != "asgi":
        return None
    try:
        request = _asgi_request(kind, owner)("/")
    except Exception:
        return None
    return "scope" if isinstance(request, dict) else type(request).__module__.partition(".")[0]


def _ask(config: StickyConfig, kind: str, owner: Any, paths: list[str]) -> dict[str, PathAnswer]:
    if config.skipper is None and config.key is None:
        return dict.fromkeys(paths, PathAnswer(skipped=False))
    if kind == "quart" and owner is not None:
        return asyncio.run(_ask_quart(config, owner, paths))
    maker = _request_maker(kind, owner)
    answers = {}
    for path in paths:
        if isinstance(maker, str):
            answers[path] = PathAnswer(None, problem=maker)
            continue
        try:
            request = maker(path)
        except Exception as error:
            answers[path] = _unmade(path, error)
            continue
        answers[path] = _decide(config, request, path)
    return answers


async def _ask_quart(config: StickyConfig, app: Any, paths: list[str]) -> dict[str, PathAnswer]:
    from quart import request

    proxy: Any = request  # a context proxy: the request object itself is behind it

    answers = {}
    for path in paths:
        try:
            async with app.test_request_context(path, method="GET", headers={"host": PROBE_HOST}):
                answers[path] = _decide(config, proxy._get_current_object(), path)
        except Exception as error:
            answers[path] = _unmade(path, error)
    return answers


def _unmade(path: str, error: Exception) -> PathAnswer:
    problem = f"its request object for GET {path} cannot be made here ({_said(error)})"
    return PathAnswer(None, problem=problem)


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _decide(config: StickyConfig, request: Any, path: str) -> PathAnswer:
    """The core's order: the key function first, then the skipper (which skips either way)."""
    try:
        key = config.key(request) if config.key is not None else None
    except Exception as error:
        return PathAnswer(None, problem=f"StickyConfig.key raised {_said(error)} for GET {path}")
    if key is not None and not isinstance(key, str):
        return PathAnswer(None, problem=f"StickyConfig.key returned {key!r} for GET {path}")
    try:
        skipped = bool(config.skipper(request)) if config.skipper is not None else False
    except Exception as error:
        return PathAnswer(
            None, problem=f"StickyConfig.skipper raised {_said(error)} for GET {path}"
        )
    return PathAnswer(skipped, key)
