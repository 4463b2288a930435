"""The app's module, read without running it: where it is, what it calls at import, and
the addresses and workers of the servers it starts when run as a script."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .facts import AppModule, Bind, EnvValue, Origin, Workers, default_said, number

#: Calls that may start serving, or block, when run at import.
SERVER_STARTS = frozenset(
    {"run", "serve", "serve_forever", "run_app", "run_forever", "run_until_complete", "run_simple"}
)
#: The address ``app.run()`` and ``uvicorn.run()`` listen on when given none.
_RUN_DEFAULTS = {
    "Sanic": ("127.0.0.1", 8000),
    "Quart": ("127.0.0.1", 5000),
    "uvicorn": ("127.0.0.1", 8000),
}
#: Arguments that hand the server a socket or a file descriptor: its address is not in the call.
_SOCKET_ARGS = frozenset({"sock", "sockets", "unix", "fd", "uds"})
_ADDRESS_ARGS = frozenset({"host", "port", "workers", "fast", *_SOCKET_ARGS})


def read_module(root: Path, directory: Path, name: str, attr: str | None) -> AppModule | None:
    """The module ``name`` under ``directory`` as Python imports it (a package before a
    module of the same name); None when it is not there."""
    if not all(name.split(".")):  # `python ..`, `python .`: no module named
        return None
    base = directory / name.replace(".", "/")
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            try:
                tree: ast.Module | None = ast.parse(path.read_bytes(), str(path))
            except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
                tree = None  # importing it says what is wrong, with its line
            try:
                file = path.relative_to(root).as_posix()
            except ValueError:
                file = str(path)
            return AppModule(name, directory, file, tree, attr, _config_line(tree))
    return None


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _is_main_guard(test: ast.expr) -> bool:
    if not isinstance(test, ast.Compare) or len(test.comparators) != 1:
        return False
    sides = {test.left, test.comparators[0]}
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def starts_at_import(tree: ast.Module) -> ast.Call | None:
    """A call at import time (outside functions and ``if __name__ == "__main__"``) that may
    start a server: then the module is not imported."""
    pending: deque[ast.AST] = deque()
    for statement in tree.body:
        if isinstance(statement, ast.If) and _is_main_guard(statement.test):
            pending.extend(statement.orelse)
        else:
            pending.append(statement)
    while pending:
        node = pending.popleft()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Call) and _call_name(node) in SERVER_STARTS:
            func = node.func
            if not (
                isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "subprocess"
            ):
                return node
        pending.extend(ast.iter_child_nodes(node))
    return None


def _config_line(tree: ast.Module | None) -> int | None:
    """The line of the app's ``StickyConfig(...)``, else of its ``StickySessions(...)``."""
    if tree is None:
        return None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    for name in ("StickyConfig", "StickySessions"):
        lines = [c.lineno for c in calls if _call_name(c) == name]
        if lines:
            return min(lines)
    return None


# --- The servers it starts when run as a script --------------------------------------------


@dataclass(frozen=True)
class ServerCall:
    """``app.run(...)``, ``app.prepare(...)``, ``uvicorn.run(...)``/``uvicorn.Config(...)``,
    or a ``.run``/``.prepare`` given an address, in the app's module."""

    call: ast.Call
    name: str
    defaults: tuple[str, int] | None
    positional_address: bool  # Sanic's and Quart's run(host, port)
    origin: Origin

    @property
    def keywords(self) -> dict[str, ast.expr]:
        return {k.arg: k.value for k in self.call.keywords if k.arg is not None}


def _server_calls(module: AppModule, tree: ast.Module) -> Iterator[ServerCall]:
    apps = {  # module-level names bound to Sanic(...) or Quart(...)
        target.id: _call_name(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        for target in node.targets
        if isinstance(target, ast.Name) and _call_name(node.value) in ("Sanic", "Quart")
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        method = node.func.attr
        receiver = getattr(node.func.value, "id", None)
        name = f"{receiver or '...'}.{method}(...)"
        origin = Origin(module.file, node.lineno, f"{module.file} {name}")
        if receiver == "uvicorn" and method == "run":
            yield ServerCall(node, name, _RUN_DEFAULTS["uvicorn"], False, origin)
        elif receiver == "uvicorn" and method == "Config":
            # No default: the sockets may come later, with Server(config).run(sockets=...).
            yield ServerCall(node, name, None, False, origin)
        elif receiver in apps and method in ("run", "prepare"):
            yield ServerCall(node, name, _RUN_DEFAULTS[str(apps[receiver])], True, origin)
        elif method in ("run", "prepare") and any(k.arg in _ADDRESS_ARGS for k in node.keywords):
            yield ServerCall(node, name, None, False, origin)


def _constants(tree: ast.Module) -> dict[str, ast.expr]:
    return {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _environ_read(node: ast.expr) -> tuple[str, ast.expr | None] | None:
    """``os.environ["X"]``, ``os.environ.get("X", d)``, ``os.getenv("X", d)``: X and d."""
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        key = node.slice
        return (
            (key.value, None)
            if isinstance(key, ast.Constant) and isinstance(key.value, str)
            else None
        )
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func, name = node.func, node.args[0]
    reads = (
        isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value)
    ) or (_call_name(node) == "getenv")
    if not reads or not isinstance(name, ast.Constant) or not isinstance(name.value, str):
        return None
    default = node.args[1] if len(node.args) > 1 else None
    return name.value, default


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or getattr(
        node, "id", ""
    ) == "environ"


def _literal(
    node: ast.expr | None,
    constants: Mapping[str, ast.expr],
    env: Mapping[str, EnvValue],
    depth: int = 0,
) -> tuple[str | None, str]:
    """What an argument evaluates to, as text, with a note of the environment it read; None
    when it cannot be told without running the app."""
    if node is None or depth > 8:
        return None, ""
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str | int)
        and not isinstance(node.value, bool)
    ):
        return str(node.value), ""
    if isinstance(node, ast.Name) and node.id in constants:
        return _literal(constants[node.id], constants, env, depth + 1)
    if isinstance(node, ast.Call) and _call_name(node) in ("int", "str") and len(node.args) == 1:
        return _literal(node.args[0], constants, env, depth + 1)
    read = _environ_read(node)
    if read is None:
        return None, ""
    name, default = read
    if name in env:
        return env[name].value, env[name].said(name)
    value, _ = _literal(default, constants, env, depth + 1)
    return value, (default_said(name, value) if value is not None else "")


def _call_bind(
    found: ServerCall, constants: Mapping[str, ast.expr], env: Mapping[str, EnvValue]
) -> Bind | None:
    call = found.call
    keywords = found.keywords
    if any(k.arg is None for k in call.keywords) or _SOCKET_ARGS & keywords.keys():
        return None  # **options, or a socket made elsewhere
    positional = call.args if found.positional_address else []
    address: list[tuple[str | None, str]] = []
    for i, what in enumerate(("host", "port")):
        node = keywords.get(what) or (positional[i] if len(positional) > i else None)
        if node is None and found.defaults is not None:
            default = str(found.defaults[i])
            address.append((default, f"the default {what} {default}"))
            continue
        value, note = _literal(node, constants, env)
        address.append((value, noted(f"{what}={value if value is not None else '?'}", note)))
    (host, host_said), (port, port_said) = address
    return Bind(host, number(port), f"{host_said}, {port_said}", found.origin)


def noted(said: str, note: str) -> str:
    """``said``, with where its value came from in brackets when that is known."""
    return said + (f" ({note})" if note else "")


def module_binds(module: AppModule | None, env: Mapping[str, EnvValue]) -> tuple[Bind, ...] | None:
    """Where a module run as ``python app.py`` listens, from its server calls; None when
    one of them cannot be read, or it has none."""
    if module is None or module.tree is None:
        return None
    constants = _constants(module.tree)
    binds = []
    for found in _server_calls(module, module.tree):
        bind = _call_bind(found, constants, env)
        if bind is None:
            return None
        binds.append(bind)
    return tuple(binds) or None


def module_workers(module: AppModule, env: Mapping[str, EnvValue]) -> Iterator[Workers]:
    """The server calls of ``module`` that start several workers (``workers=4``, Sanic's
    ``fast=True``)."""
    if module.tree is None:
        return
    constants = _constants(module.tree)
    for found in _server_calls(module, module.tree):
        keywords = found.keywords
        workers, _ = _literal(keywords.get("workers"), constants, env)
        if (number(workers) or 0) > 1:
            yield Workers(f"{found.name} with workers={workers}", found.origin)
        fast = keywords.get("fast")
        if isinstance(fast, ast.Constant) and fast.value is True:
            yield Workers(f"{found.name} with fast=True (a worker per CPU)", found.origin)
