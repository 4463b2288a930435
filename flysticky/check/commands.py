"""The commands the machines run (Dockerfile ENTRYPOINT + CMD, fly.toml ``[processes]``, a
Procfile) and what each starts: the server, the app's module, the addresses it listens on
and its workers, as far as the command's words tell."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .facts import (
    DEFAULT_PROCESS,
    AppModule,
    Bind,
    Command,
    EnvValue,
    Launch,
    Origin,
    TomlLines,
    Workers,
    default_said,
    number,
)
from .source import module_binds, noted, read_module

# --- Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    argv: tuple[str, ...]
    line: int


@dataclass
class Stage:
    """What a Dockerfile stage leaves to the image: its environment and start command."""

    env: dict[str, EnvValue] = field(default_factory=dict)
    cmd: Instruction | None = None
    entrypoint: Instruction | None = None


#: A heredoc (``RUN <<EOF``, ``COPY <<-"EOF" /app/x``): its body lines are no instructions.
_HEREDOC = re.compile(r"(?<!<)<<(?!<)(-?)([\"']?)([A-Za-z_][\w.-]*)\2")
_HEREDOC_KEYWORDS = frozenset({"RUN", "COPY", "ADD"})


def _instructions(text: str) -> Iterator[tuple[int, str, str]]:
    """Each instruction as (first line, KEYWORD, arguments), continuation lines joined,
    heredoc bodies passed over."""
    start, parts = 0, list[str]()
    heredocs: list[tuple[str, bool]] = []  # the delimiters to come, and whether tabs go
    for row, raw in enumerate(text.splitlines(), 1):
        if heredocs:
            delimiter, tabs = heredocs[0]
            if (raw.lstrip("\t") if tabs else raw) == delimiter:
                heredocs.pop(0)
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and blank lines inside a continued instruction too
        if not parts:
            start = row
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        keyword, _, rest = " ".join(parts).partition(" ")
        parts = []
        keyword = keyword.upper()
        if keyword in _HEREDOC_KEYWORDS:
            heredocs = [(m[3], m[1] == "-") for m in _HEREDOC.finditer(rest)]
        yield start, keyword, rest.strip()


def _exec_or_shell(rest: str, line: int) -> Instruction:
    if rest.startswith("["):
        try:
            words = json.loads(rest)
        except json.JSONDecodeError:
            words = None
        if isinstance(words, list) and all(isinstance(w, str) for w in words):
            return Instruction(tuple(words), line)
    return Instruction(("/bin/sh", "-c", rest), line)


def _words(rest: str) -> list[str]:
    try:
        return shlex.split(rest)
    except ValueError:
        return []


def _env_pairs(rest: str) -> list[tuple[str, str]]:
    words = _words(rest)
    if words and "=" not in words[0]:  # the legacy form: ENV NAME value
        return [(words[0], " ".join(words[1:]))]
    return [(name, value) for name, _, value in (w.partition("=") for w in words if "=" in w)]


def _arg_pairs(rest: str) -> list[tuple[str, str | None]]:
    """``ARG NAME=default`` and ``ARG NAME`` (None: no default of its own)."""
    return [
        (name, value if equals else None)
        for name, equals, value in (w.partition("=") for w in _words(rest))
    ]


def read_dockerfile(text: str, file: str) -> Stage:
    """The final stage of a Dockerfile (a stage built FROM an earlier one starts as it).
    ENV values are expanded from the ARGs and ENVs before them, as Docker builds them."""
    stages: dict[str, Stage] = {}
    stage = Stage()
    # ARGs before the first FROM are defaults for a stage's bare ``ARG NAME``.
    global_args: dict[str, EnvValue] = {}
    args: dict[str, EnvValue] | None = None  # the stage's; None before the first FROM
    for line, keyword, rest in _instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = stages.get(words[0].lower()) if words else None
            stage = Stage(dict(base.env), base.cmd, base.entrypoint) if base else Stage()
            args = {}
            if len(words) >= 3 and words[1].lower() == "as":
                stages[words[2].lower()] = stage
        elif keyword == "ARG":
            scope = global_args if args is None else args
            for name, value in _arg_pairs(rest):
                origin = Origin(file, line, f"{file} ARG {name}")
                if value is not None:
                    scope[name] = EnvValue(_built(value, {**scope, **stage.env}), origin)
                elif args is not None and name in global_args:
                    args[name] = global_args[name]
        elif keyword == "ENV":
            known = {**(args or {}), **stage.env}
            for name, value in _env_pairs(rest):
                origin = Origin(file, line, f"{file} ENV {name}")
                stage.env[name] = EnvValue(_built(value, known), origin)
        elif keyword == "CMD":
            stage.cmd = _exec_or_shell(rest, line)
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_or_shell(rest, line)
    return stage


def _built(value: str, known: Mapping[str, EnvValue]) -> str:
    """``value`` with the variables Docker expands at build time; as written when one of
    them is set nowhere."""
    expanded, _ = expand(value, known)
    return value if expanded is None else expanded


# --- The commands ---------------------------------------------------------------------------


def commands(
    fly: dict[str, Any],
    lines: TomlLines,
    stage: Stage | None,
    dockerfile: str,
    procfile: str | None,
) -> list[Command]:
    """fly.toml's processes, else the Dockerfile's command; then the Procfile's lines."""
    # Docker runs ENTRYPOINT + CMD; a shell-form ENTRYPOINT ignores CMD. A fly.toml process
    # replaces CMD and keeps the ENTRYPOINT.
    entry = stage.entrypoint if stage is not None else None
    prefix = list(entry.argv) if entry is not None and entry.argv[:2] != ("/bin/sh", "-c") else []
    found = []
    processes = fly.get("processes")
    if isinstance(processes, dict) and processes:
        for name, text in processes.items():
            try:
                words = shlex.split(text) if isinstance(text, str) else []
            except ValueError:
                words = []
            if words:
                where = Origin(
                    "fly.toml", lines.line("processes", name), f"fly.toml [processes] {name}"
                )
                found.append(Command((*prefix, *words), where, name))
    elif stage is not None and (stage.cmd is not None or entry is not None):
        instruction: Instruction | None
        if entry is not None and not prefix:
            argv, instruction = entry.argv, entry
        else:
            instruction = stage.cmd or entry
            argv = (*prefix, *(stage.cmd.argv if stage.cmd is not None else ()))
        assert instruction is not None
        keyword = "CMD" if instruction is stage.cmd else "ENTRYPOINT"
        where = Origin(dockerfile, instruction.line, f"{dockerfile} {keyword}")
        found.append(Command(tuple(argv), where, DEFAULT_PROCESS))
    for row, line in enumerate((procfile or "").splitlines(), 1):
        name, colon, text = line.partition(":")
        if colon and name.strip() and not name.lstrip().startswith("#"):
            try:
                words = shlex.split(text)
            except ValueError:
                continue
            where = Origin("Procfile", row, f"Procfile {name.strip()}")
            found.append(Command(tuple(words), where, None))
    return found


# --- What a command starts -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """A server's command line: option spelling -> what it sets ("host", "port", "bind",
    "workers", "fast", "socket", "config", "directory", "target", "attr"), its default
    address, and the environment variables it reads a setting from."""

    flags: Mapping[str, str]
    default_host: str
    default_port: int
    env: Mapping[str, str] = field(default_factory=dict)
    #: Sanic's CLI also takes ``module.app``, not only ``module:app``.
    dotted: bool = False


def _spelled(**settings: str) -> dict[str, str]:
    """Option spellings by what they set: ``_spelled(port="--port -p")``."""
    return {flag: what for what, flags in settings.items() for flag in flags.split()}


SERVERS: dict[str, ServerSpec] = {
    "uvicorn": ServerSpec(
        _spelled(host="--host", port="--port", workers="--workers", socket="--uds --fd",
                 directory="--app-dir"),
        "127.0.0.1", 8000, {"host": "UVICORN_HOST", "port": "UVICORN_PORT"},
    ),
    "hypercorn": ServerSpec(
        _spelled(bind="--bind -b", workers="--workers -w", config="--config -c"),
        "127.0.0.1", 8000,
    ),
    "sanic": ServerSpec(
        _spelled(host="--host -H", port="--port -p", workers="--workers -w", fast="--fast",
                 socket="--unix -u"),
        "127.0.0.1", 8000, dotted=True,
    ),
    "gunicorn": ServerSpec(
        _spelled(bind="--bind -b", workers="--workers -w", config="--config -c",
                 directory="--chdir"),
        "127.0.0.1", 8000,
    ),
    "fastapi": ServerSpec(
        _spelled(host="--host", port="--port", workers="--workers", attr="--app",
                 target="--entrypoint"),
        "0.0.0.0", 8000,
    ),
    "litestar": ServerSpec(
        _spelled(host="--host -H", port="--port -p", workers="--wc --web-concurrency -W",
                 target="--app", directory="--app-dir", socket="--uds --fd"),
        "127.0.0.1", 8000,
        {"host": "LITESTAR_HOST", "port": "LITESTAR_PORT", "target": "LITESTAR_APP"},
    ),
}  # fmt: skip
#: Words that run the next ones: skipped to find the server in ``tini -- uvicorn ...``.
WRAPPERS = frozenset(
    {
        "exec",
        "env",
        "nohup",
        "tini",
        "dumb-init",
        "ddtrace-run",
        "opentelemetry-instrument",
        "newrelic-admin",
        "run-program",
    }
)
_SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
_OPERATORS = frozenset({"&&", "||", ";", "|", "&", ";;"})
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
_TARGET = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)(?:\(\))?")
_DOTTED = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.([A-Za-z_]\w*)")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::?-([^}]*))?\}|(\w+))")


def _program(word: str) -> str | None:
    name = Path(word).name
    if re.fullmatch(r"python(?:\d+(?:\.\d+)?)?", name):
        return "python"
    return name if name in SERVERS else None


def _runs_next(word: str) -> bool:
    """A word that runs the words after it: a wrapper, its options, an assignment, an
    entrypoint script (``docker-entrypoint.sh``, which execs its arguments)."""
    name = Path(word).name
    return (
        name in WRAPPERS
        or name.endswith(".sh")
        or word.startswith("-")
        or _ASSIGNMENT.fullmatch(word) is not None
    )


def _simple_commands(argv: Sequence[str]) -> list[list[str]]:
    """The simple commands of ``argv``: a ``sh -c`` script (or ``tini -- sh -c``, as an exec
    ENTRYPOINT runs a shell-form CMD) is split at ``&&``, ``;``, ``|``."""
    for i, word in enumerate(argv):
        if Path(word).name in _SHELLS and i + 2 < len(argv) and re.fullmatch(r"-\w*c", argv[i + 1]):
            return _script_commands(argv[i + 2])
        if not _runs_next(word):
            break
    return [list(argv)]


def _script_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return []
    commands: list[list[str]] = [[]]
    for word in words:
        if word in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def _unwrapped(words: list[str]) -> list[str]:
    """``words`` from the server or Python they run, past wrappers and assignments; []
    when they run something else (``pip install uvicorn`` is not uvicorn)."""
    for i, word in enumerate(words):
        if _program(word) is not None:
            return words[i:]
        if not _runs_next(word):
            return []
    return []


def expand(text: str, env: Mapping[str, EnvValue]) -> tuple[str | None, str]:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` replaced from the environment, with
    a note of where each came from; None when one is set nowhere and has no default."""
    notes: list[str] = []
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        name, default = match[1] or match[3], match[2]
        if name in env:
            notes.append(env[name].said(name))
            return env[name].value
        if default is not None:
            notes.append(default_said(name, default))
            return default
        missing = True
        return ""

    expanded = _VARIABLE.sub(value, text)
    return (None if missing else expanded), "; ".join(notes)


def _address(text: str) -> tuple[str | None, int | None] | None:
    """A bind's host and port (``[::]:8080``, ``0.0.0.0:8080``); None for a socket that is
    not TCP (``unix:``, ``fd://``), whose address Fly does not reach."""
    if text.startswith(("unix:", "fd://", "quic:")):
        return None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, number(rest.removeprefix(":"))
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, None
    return (host or None), number(port)


def _options(spec: ServerSpec, words: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The options the checks care about, by what they set, as ``--flag value`` texts; and the
    positional words. Options ``spec`` does not know are taken to need no value."""
    options: dict[str, list[str]] = {}
    positionals: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            positionals.extend(words[i:])
            break
        if not word.startswith("-") or word == "-":
            positionals.append(word)
            continue
        flag, equals, value = word.partition("=")
        what = spec.flags.get(flag)
        if what is None and not word.startswith("--") and len(word) > 2:
            flag, equals, value = word[:2], "=", word[2:]  # -w4, -b[::]:8080
            what = spec.flags.get(flag)
        if what is None:
            continue
        if what == "fast":
            options[what] = [flag]
            continue
        if not equals:
            if i >= len(words):
                break
            value, i = words[i], i + 1
        options.setdefault(what, []).append(f"{flag} {value}")
    return options, positionals


def _value_of(option: str) -> str:
    return option.partition(" ")[2]


@dataclass(frozen=True)
class _ServerCommand:
    """A server's command line, read: its options by what they set, its positional words,
    and the environment its ``$VARIABLES`` and settings come from."""

    program: str
    spec: ServerSpec
    options: dict[str, list[str]]
    positionals: list[str]
    env: Mapping[str, EnvValue]
    origin: Origin

    def last(self, what: str) -> str | None:
        """The value of the last option that sets ``what``."""
        return _value_of(self.options[what][-1]) if what in self.options else None

    def module(self, root: Path) -> AppModule | None:
        """The app's module: module:app, a fastapi path, Litestar's --app or LITESTAR_APP."""
        targets = [_value_of(t) for t in self.options.get("target", [])]
        variable = self.spec.env.get("target")
        if variable is not None and variable in self.env:
            targets.append(self.env[variable].value)
        directory = root / (self.last("directory") or "")
        for target in targets + self.positionals:
            if target.endswith(".py"):  # `fastapi run main.py`, `sanic server.py`
                path = Path(target)
                return read_module(root, directory / path.parent, path.stem, self.last("attr"))
            match = _TARGET.fullmatch(target) or (
                _DOTTED.fullmatch(target) if self.spec.dotted else None
            )
            if match is not None:
                return read_module(root, directory, match[1], match[2])
        return None

    def workers(self) -> list[Workers]:
        workers = [
            Workers(f"{self.program} {option}", self.origin)
            for option in self.options.get("workers", [])
            if (number(expand(_value_of(option), self.env)[0]) or 0) > 1
        ]
        if "fast" in self.options:
            fast = self.options["fast"][0]
            workers.append(Workers(f"{self.program} {fast} (a worker per CPU)", self.origin))
        return workers

    def binds(self, root: Path) -> tuple[Bind, ...] | None:
        if "socket" in self.options:
            return None
        if "bind" in self.spec.flags.values():  # hypercorn, gunicorn: --bind host:port, repeated
            return self._bind_options(root)
        default_host = self.spec.default_host
        if self.program == "fastapi" and self.positionals[:1] == ["dev"]:
            default_host = "127.0.0.1"  # `fastapi dev` listens on loopback, `fastapi run` on all
        host, host_said = self._setting("host", default_host)
        port, port_said = self._setting("port", str(self.spec.default_port))
        return (Bind(host, number(port), f"{host_said}, {port_said}", self.origin),)

    def _bind_options(self, root: Path) -> tuple[Bind, ...] | None:
        binds = []
        for option in self.options.get("bind", []):
            text, note = expand(_value_of(option), self.env)
            address = _address(text) if text is not None else (None, None)
            if address is not None:
                binds.append(Bind(*address, noted(option, note), self.origin))
        if binds:
            return tuple(binds)
        if self.options.get("bind") or "config" in self.options:
            return None  # only non-TCP binds, or a config file that may bind elsewhere
        if self.program == "gunicorn":
            if "GUNICORN_CMD_ARGS" in self.env or (root / "gunicorn.conf.py").is_file():
                return None
            if "PORT" in self.env:  # gunicorn's documented default when PORT is set
                variable = self.env["PORT"]
                said = f"gunicorn's default 0.0.0.0:$PORT, {variable.value} from {variable.origin}"
                return (Bind("0.0.0.0", number(variable.value), said, self.origin),)
        spec = self.spec
        said = f"no --bind: {self.program}'s default {spec.default_host}:{spec.default_port}"
        return (Bind(spec.default_host, spec.default_port, said, self.origin),)

    def _setting(self, what: str, default: str) -> tuple[str | None, str]:
        if what in self.options:
            option = self.options[what][-1]
            text, note = expand(_value_of(option), self.env)
            return text, noted(option, note)
        variable = self.spec.env.get(what)
        if variable is not None and variable in self.env:
            return self.env[variable].value, self.env[variable].said(variable)
        return default, f"no --{what}: {self.program}'s default {what} {default}"


def _server_launch(
    command: Command, program: str, words: Sequence[str], root: Path, env: Mapping[str, EnvValue]
) -> Launch:
    spec = SERVERS[program]
    server = _ServerCommand(program, spec, *_options(spec, words), env, command.origin)
    return Launch(command, server.module(root), server.binds(root), tuple(server.workers()))


def _python_launch(
    command: Command, words: Sequence[str], root: Path, env: Mapping[str, EnvValue]
) -> Launch | None:
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            return None  # code on the command line: nothing to read
        if word.startswith("-m"):
            name = word[2:] or (words[i + 1] if i + 1 < len(words) else "")
            rest = words[i + 1 :] if word[2:] else words[i + 2 :]
            if name in SERVERS:
                return _server_launch(command, name, rest, root, env)
            module = read_module(root, root, name, None)
            return Launch(command, module, module_binds(module, env))
        if word in ("-X", "-W"):
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        script = Path(word)
        # An absolute path is the image's (WORKDIR /app): the project is its directory.
        directory = root if script.is_absolute() else root / script.parent
        module = read_module(root, directory, script.stem, None)
        return Launch(command, module, module_binds(module, env))
    return None


def launch(command: Command, root: Path, env: Mapping[str, EnvValue]) -> Launch | None:
    """What ``command`` starts: the last server or Python of its simple commands (the ones
    before it are set-up: ``python manage.py migrate && gunicorn ...``)."""
    for words in reversed(_simple_commands(command.argv)):
        words = _unwrapped(words)
        if not words:
            continue
        program = _program(words[0])
        if program == "python":
            return _python_launch(command, words[1:], root, env)
        assert program is not None
        return _server_launch(command, program, words[1:], root, env)
    return None
