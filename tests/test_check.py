"""``flysticky check``: each broken shape of a project is caught, with where, why and the fix;
the template's projects pass with nothing to say; no traceback, whatever the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from flysticky.check import Finding, Report, check
from flysticky.cli import main

ROOT = Path(__file__).parent.parent

FLY = """\
app = "check-demo"
primary_region = "iad"

[env]
  PORT = "8080"

[http_service]
  internal_port = 8080
  auto_stop_machines = "suspend"
  processes = ["app"]

  [[http_service.http_options.replay_cache]]
    path_prefix = "/"
    ttl_seconds = 300
    type = "cookie"
    name = "fly-machine-id"
"""
DOCKERFILE = 'FROM python:3.12-slim\nWORKDIR /app\nCOPY . .\nCMD ["python", "app.py"]\n'
#: Fly's health check, added where the skipper is what a test is about.
HEALTH = '\n  [[http_service.checks]]\n    path = "/health"\n'


def config_app(**config: str) -> str:
    """An app module holding a bare StickyConfig: the quickest to import (nothing of an
    adapter's), for the checks that need no skipper or key function asked."""
    arguments = ", ".join(f"{name}={value}" for name, value in config.items())
    return f"from flysticky import StickyConfig\n\nconfig = StickyConfig({arguments})\n"


def asgi_app(**config: str) -> str:
    """A plain ASGI app behind flysticky: its skipper and key function get the scope."""
    settings = {"skipper": 'lambda scope: scope["path"] == "/health"', **config}
    arguments = ", ".join(f"{name}={value}" for name, value in settings.items())
    return (
        "from flysticky import StickyConfig\n"
        "from flysticky.asgi import StickySessions\n\n\n"
        "async def inner(scope, receive, send):\n"
        "    pass\n\n\n"
        f"app = StickySessions(inner, StickyConfig({arguments}))\n"
    )


APP = config_app()
ROOMS = 'lambda scope: scope["path"].split("/")[2] if scope["path"].startswith("/rooms/") else None'


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def make(tmp_path: Path, files: Mapping[str, str | None] | None = None) -> Path:
    """A project: the good fly.toml, Dockerfile and app.py, but for ``files`` (None: absent)."""
    contents: dict[str, str | None] = {"fly.toml": FLY, "Dockerfile": DOCKERFILE, "app.py": APP}
    contents.update(files or {})
    for name, text in contents.items():
        if text is not None:
            tmp_path.joinpath(name).parent.mkdir(parents=True, exist_ok=True)
            tmp_path.joinpath(name).write_text(text)
    return tmp_path


def ids(report: Report) -> list[str]:
    return [f.id for f in report.findings]


def only(report: Report, id: str) -> Finding:
    found = [f for f in report.findings if f.id == id]
    assert len(found) == 1, report.findings
    return found[0]


def line_of(text: str, fragment: str, occurrence: int = 0) -> int:
    numbers = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    return numbers[occurrence]


def test_a_sound_project_has_nothing_to_report(tmp_path: Path) -> None:
    report = check(make(tmp_path, {"fly.toml": FLY + HEALTH, "app.py": asgi_app()}))
    assert report.findings == [] and report.accepted == []
    assert report.config_source == "app.py, `app` (flysticky.asgi.StickySessions)"
    assert not list(tmp_path.rglob("__pycache__")), "the import left bytecode in the project"


# --- The template's projects ---------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("generated")
    frameworks = json.loads(ROOT.joinpath("template", "cookiecutter.json").read_text())["framework"]
    return {
        framework: Path(
            cookiecutter(
                str(ROOT / "template"),
                no_input=True,
                output_dir=str(out),
                # A requirement, not the vendored wheel: nothing to build, the same app.
                extra_context={
                    "framework": framework,
                    "project_name": f"check {framework}",
                    "flysticky_requirement": "flysticky>=0.1",
                },
            )
        )
        for framework in frameworks
    }


def test_every_generated_project_passes_with_nothing_to_report(generated: dict[str, Path]) -> None:
    assert sorted(generated) == ["fastapi", "quart", "sanic"]
    for framework, project in generated.items():
        result = subprocess.run(
            [sys.executable, "-m", "flysticky.cli", "check", "--json", str(project)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        report = json.loads(result.stdout)
        assert (result.returncode, report["findings"]) == (0, []), (framework, result.stderr)
        assert report == {"path": str(project), "findings": [], "errors": 0, "warnings": 0}


# --- 1. The replay cache -----------------------------------------------------------------


def test_no_replay_cache_is_a_warning_with_the_entry_to_write(tmp_path: Path) -> None:
    fly = FLY[: FLY.index("  [[http_service.http_options")]
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "replay-cache-missing")
    assert finding.severity == "warning"
    assert (finding.file, finding.line) == ("fly.toml", line_of(fly, "[http_service]"))
    assert "[[http_service.http_options.replay_cache]]" in finding.fix
    assert 'name = "fly-machine-id"' in finding.fix and "replay hop" in finding.why


def test_replay_cache_on_another_cookie_is_an_error(tmp_path: Path) -> None:
    fly = edit(FLY, 'name = "fly-machine-id"', 'name = "session"')
    report = check(make(tmp_path, {"fly.toml": fly}))
    finding = only(report, "replay-cache-wrong-cookie")
    assert finding.severity == "error" and report.errors == 1
    assert finding.line == line_of(fly, 'name = "session"')
    assert '"session"' in finding.what and '"fly-machine-id"' in finding.what
    assert finding.fix == 'name = "fly-machine-id"'
    assert "replay-cache-missing" not in ids(report)  # the error says it all


def test_replay_cache_is_compared_with_the_apps_own_cookie_name(tmp_path: Path) -> None:
    report = check(make(tmp_path, {"app.py": config_app(cookie_name='"pin"')}))
    assert only(report, "replay-cache-wrong-cookie").fix == 'name = "pin"'


def test_replay_cache_in_the_services_form(tmp_path: Path) -> None:
    fly = """\
app = "check-demo"
primary_region = "iad"

[[services]]
  internal_port = 8080
  protocol = "tcp"

  [[services.ports]]
    port = 443
    handlers = ["tls", "http"]

    [[services.ports.http_options.replay_cache]]
      path_prefix = "/"
      ttl_seconds = 5
      type = "cookie"
      name = "sid"
"""
    report = check(make(tmp_path, {"fly.toml": fly}))
    assert sorted(ids(report)) == ["replay-cache-ttl-too-short", "replay-cache-wrong-cookie"]
    assert only(report, "replay-cache-wrong-cookie").line == line_of(fly, 'name = "sid"')
    assert only(report, "replay-cache-ttl-too-short").line == line_of(fly, "ttl_seconds")


def test_replay_cache_on_a_header_other_than_the_session_header_is_an_error(
    tmp_path: Path,
) -> None:
    entry = (
        '\n  [[http_service.http_options.replay_cache]]\n    path_prefix = "/api/"\n'
        '    ttl_seconds = 60\n    type = "header"\n    name = "x-session"\n'
    )
    report = check(make(tmp_path, {"fly.toml": FLY + entry}))
    finding = only(report, "replay-cache-wrong-header")
    assert "session_header is None" in finding.what and "x-session" in finding.fix
    report = check(make(tmp_path, {"app.py": config_app(session_header='"mcp-session-id"')}))
    assert report.findings == []  # no header entry: nothing wrong
    tmp_path.joinpath("fly.toml").write_text(FLY + entry)
    finding = only(check(tmp_path), "replay-cache-wrong-header")
    assert finding.fix == 'name = "mcp-session-id"'


def test_replay_cache_ttl_under_ten_seconds_is_an_error(tmp_path: Path) -> None:
    fly = edit(FLY, "ttl_seconds = 300", "ttl_seconds = 5")
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "replay-cache-ttl-too-short")
    assert finding.severity == "error" and finding.fix == "ttl_seconds = 300"
    assert "ttl_seconds = 5" in finding.what


def test_replay_cache_lines_count_the_entries_of_every_service(tmp_path: Path) -> None:
    # fly.toml numbers [[services.ports.http_options.replay_cache]] in file order, a TCP-only
    # service's entries too: the second entry here is the http service's.
    entry = (
        '    [[services.ports.http_options.replay_cache]]\n      path_prefix = "/"\n'
        '      ttl_seconds = 300\n      type = "cookie"\n      name = "{}"\n'
    )
    fly = (
        'app = "check-demo"\nprimary_region = "iad"\n\n'
        "[[services]]\n  internal_port = 9000\n  [[services.ports]]\n    port = 9000\n"
        '    handlers = ["tls"]\n' + entry.format("fly-machine-id") + "\n"
        "[[services]]\n  internal_port = 8080\n  [[services.ports]]\n    port = 443\n"
        '    handlers = ["tls", "http"]\n' + entry.format("sid")
    )
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "replay-cache-wrong-cookie")
    assert finding.line == line_of(fly, 'name = "sid"')


# --- 2. Replays Fly never caches ---------------------------------------------------------


def test_replay_cache_over_key_routes_never_fills(tmp_path: Path) -> None:
    entry = (
        '\n  [[http_service.http_options.replay_cache]]\n    path_prefix = "/rooms/"\n'
        '    ttl_seconds = 60\n    type = "cookie"\n    name = "fly-machine-id"\n'
    )
    fly = FLY + entry
    report = check(make(tmp_path, {"fly.toml": fly, "app.py": asgi_app(key=ROOMS)}))
    finding = only(report, "replay-cache-never-filled")
    assert finding.severity == "warning"
    assert finding.line == line_of(fly, 'path_prefix = "/rooms/"')
    assert "state=flysticky-key" in finding.what and "'flysticky-check'" in finding.what
    assert len(report.findings) == 1  # the entry at "/" is decided by the cookie: fine


def test_session_header_cache_that_the_cookie_rides_along_never_fills(tmp_path: Path) -> None:
    entry = (
        '\n  [[http_service.http_options.replay_cache]]\n    path_prefix = "/mcp"\n'
        '    ttl_seconds = 60\n    type = "header"\n    name = "mcp-session-id"\n'
    )
    fly = FLY + entry
    app = asgi_app(session_header='"mcp-session-id"')
    finding = only(
        check(make(tmp_path, {"fly.toml": fly, "app.py": app})), "replay-cache-header-gets-cookie"
    )
    assert finding.line == line_of(fly, 'path_prefix = "/mcp"')
    assert "Path / covers it" in finding.what and "skipper=" in finding.fix
    # Skip a session's first request (no id yet): no cookie, so the replays are cached.
    skipper = (
        'lambda scope: scope["path"] == "/health" or (scope["path"].startswith("/mcp") '
        'and b"mcp-session-id" not in dict(scope["headers"]))'
    )
    app = asgi_app(session_header='"mcp-session-id"', skipper=skipper)
    assert check(make(tmp_path, {"app.py": app})).findings == []


#: The skipper the fix for replay-cache-header-gets-cookie spells, by the app's request object.
SKIP_FIRST_SESSION_REQUEST = {
    "sanic": 'lambda request: request.path.startswith("/mcp") and '
    '"mcp-session-id" not in request.headers',
    "starlette": 'lambda request: request.url.path.startswith("/mcp") and '
    '"mcp-session-id" not in request.headers',
    "asgi": 'lambda scope: scope["path"].startswith("/mcp") and '
    'b"mcp-session-id" not in dict(scope["headers"])',
}


@pytest.mark.parametrize(
    ("framework", "spelled"),
    [
        ("sanic", "sanic"),
        ("quart", "sanic"),
        ("starlette", "starlette"),
        ("fastapi", "starlette"),
        ("litestar", "starlette"),
        ("asgi", "asgi"),
    ],
)
def test_session_header_fix_spells_the_skipper_for_the_apps_request(
    tmp_path: Path, framework: str, spelled: str
) -> None:
    entry = (
        '\n  [[http_service.http_options.replay_cache]]\n    path_prefix = "/mcp"\n'
        '    ttl_seconds = 60\n    type = "header"\n    name = "mcp-session-id"\n'
    )
    header = 'session_header="mcp-session-id", '
    if framework == "asgi":  # a plain ASGI app: its skipper gets the scope
        app = asgi_app(session_header='"mcp-session-id"')
    else:
        app = FRAMEWORK_APPS[framework].replace("StickyConfig(", "StickyConfig(" + header)
    report = check(make(tmp_path, {"fly.toml": FLY + entry, "app.py": app}))
    fix = only(report, "replay-cache-header-gets-cookie").fix
    suggested = re.search(r"\(skipper=(lambda .*)\), or give", fix)
    assert suggested is not None and suggested[1] == SKIP_FIRST_SESSION_REQUEST[spelled]
    # The skipper it spells works: with it, the entry fills.
    if framework == "asgi":
        app = asgi_app(session_header='"mcp-session-id"', skipper=suggested[1])
    else:
        app = re.sub(
            r"StickyConfig\(skipper=lambda [^)]*",
            lambda _: f"StickyConfig({header}skipper={suggested[1]}",
            FRAMEWORK_APPS[framework],
        )
    assert check(make(tmp_path, {"app.py": app})).findings == []


# --- 3. One process per machine ----------------------------------------------------------

SANIC_RUN = """\
from sanic import Sanic

from flysticky.sanic import StickySessions

app = Sanic("check_workers")
StickySessions(app)

if __name__ == "__main__":
    app.{call}
"""


@pytest.mark.parametrize(
    ("call", "said"),
    [
        ('run(host="::", port=8080, workers=4)', "app.run(...) with workers=4"),
        ('prepare(host="::", port=8080, fast=True)', "app.prepare(...) with fast=True"),
    ],
)
def test_sanic_workers_in_the_app_are_an_error(tmp_path: Path, call: str, said: str) -> None:
    app = SANIC_RUN.format(call=call)
    report = check(make(tmp_path, {"app.py": app}))
    finding = only(report, "several-processes")
    assert (finding.severity, finding.file, finding.line) == ("error", "app.py", 9)
    assert said in finding.what and "fly scale count" in finding.fix
    assert report.config_source == "app.py, `app` (flysticky.sanic.StickySessions)"


@pytest.mark.parametrize(
    ("files", "where", "said"),
    [
        (
            {
                "Dockerfile": 'FROM python:3.12\nCMD ["uvicorn", "app:app", "--host", "::", '
                '"--port", "8080", "--workers", "4"]\n'
            },
            ("Dockerfile", 2),
            "uvicorn --workers 4",
        ),
        (
            {"fly.toml": FLY + '\n[processes]\n  app = "hypercorn app:app -b [::]:8080 -w2"\n'},
            ("fly.toml", FLY.count("\n") + 3),
            "hypercorn -w 2",
        ),
        (
            {"Procfile": "release: python migrate.py\nweb: gunicorn app:app -w 3 -b [::]:8080\n"},
            ("Procfile", 2),
            "gunicorn -w 3",
        ),
        (
            {
                "Dockerfile": "FROM python:3.12\nENV PYTHONUNBUFFERED=1 \\\n    WEB_CONCURRENCY=2\n"
                'CMD ["python", "app.py"]\n'
            },
            ("Dockerfile", 2),
            "WEB_CONCURRENCY=2",
        ),
        (
            {"fly.toml": edit(FLY, 'PORT = "8080"', 'PORT = "8080"\n  WEB_CONCURRENCY = 3')},
            ("fly.toml", line_of(FLY, 'PORT = "8080"') + 1),
            "WEB_CONCURRENCY=3",
        ),
    ],
    ids=["uvicorn-cmd", "hypercorn-process", "gunicorn-procfile", "dockerfile-env", "fly-env"],
)
def test_several_workers_anywhere_are_an_error(
    tmp_path: Path, files: dict[str, str], where: tuple[str, int], said: str
) -> None:
    finding = only(check(make(tmp_path, files)), "several-processes")
    assert (finding.file, finding.line) == where
    assert said in finding.what


@pytest.mark.parametrize(
    ("dockerfile", "fly", "expected", "said"),
    [
        (
            "ARG WORKERS=4\nFROM python:3.12\nARG WORKERS\nENV WEB_CONCURRENCY=$WORKERS\n"
            'CMD ["python", "app.py"]\n',
            FLY,
            "several-processes",
            "WEB_CONCURRENCY=4",
        ),
        (
            "FROM python:3.12\nARG PORT=8000\nENV PORT=${PORT}\n"
            "CMD uvicorn app:app --host :: --port $PORT\n",
            edit(FLY, 'PORT = "8080"', 'OTHER = "x"'),
            "internal-port-mismatch",
            "PORT=8000 from Dockerfile ENV PORT, line 3",
        ),
    ],
    ids=["workers", "port"],
)
def test_dockerfile_args_reach_the_env_they_set(
    tmp_path: Path, dockerfile: str, fly: str, expected: str, said: str
) -> None:
    finding = only(check(make(tmp_path, {"Dockerfile": dockerfile, "fly.toml": fly})), expected)
    assert said in finding.what


def test_heredoc_bodies_are_not_instructions(tmp_path: Path) -> None:
    dockerfile = (
        "FROM python:3.12\nRUN <<EOF\nenv WEB_CONCURRENCY=4 python -c 'print(1)'\nEOF\n"
        'CMD ["python", "app.py"]\n'
        'COPY <<-"END" /app/notes.txt\n\tCMD ["uvicorn", "app:app", "--port", "1"]\n\tEND\n'
    )
    assert check(make(tmp_path, {"Dockerfile": dockerfile})).findings == []


def test_several_process_groups_and_single_workers_are_fine(tmp_path: Path) -> None:
    processes = (
        '\n[processes]\n  app = "uvicorn app:app --host :: --port 8080 --workers 1"\n'
        '  worker = "python worker.py"\n  cron = "python cron.py"\n'
    )
    assert check(make(tmp_path, {"fly.toml": FLY + processes})).findings == []


# --- 4. internal_port --------------------------------------------------------------------


def test_internal_port_other_than_the_cli_port_is_an_error(tmp_path: Path) -> None:
    dockerfile = 'FROM python:3.12\nCMD ["uvicorn", "app:app", "--host", "::", "--port", "8000"]\n'
    report = check(make(tmp_path, {"Dockerfile": dockerfile}))
    finding = only(report, "internal-port-mismatch")
    assert (finding.severity, finding.file, finding.line) == ("error", "fly.toml", 8)
    assert "internal_port = 8080" in finding.what and "port 8000" in finding.what
    assert "port 8000 (Dockerfile CMD, line 2: --host ::, --port 8000)" in finding.what
    assert finding.fix == "internal_port = 8000, or make the app listen on 8080."


def test_internal_port_other_than_port_from_the_environment_is_an_error(tmp_path: Path) -> None:
    dockerfile = "FROM python:3.12\nCMD exec hypercorn app:app --bind [::]:${PORT}\n"
    fly = edit(FLY, 'PORT = "8080"', 'PORT = "9000"')
    finding = only(
        check(make(tmp_path, {"Dockerfile": dockerfile, "fly.toml": fly})), "internal-port-mismatch"
    )
    assert "port 9000" in finding.what and "PORT=9000 from fly.toml [env] PORT" in finding.what


def test_a_generated_project_whose_internal_port_left_port_behind_is_warned(
    generated: dict[str, Path], tmp_path: Path
) -> None:
    """The template's apps listen on a socket they make from $PORT, which the check cannot
    read: internal_port against the machines' PORT says what it can."""
    project = tmp_path / "moved"
    shutil.copytree(generated["sanic"], project)
    fly = project / "fly.toml"
    fly.write_text(fly.read_text().replace("internal_port = 8080", "internal_port = 3000"))
    finding = only(check(project), "port-env-mismatch")
    assert finding.severity == "warning" and finding.line == line_of(
        fly.read_text(), "internal_port = 3000"
    )
    assert (
        "internal_port = 3000" in finding.what
        and "PORT=8080 from fly.toml [env] PORT" in finding.what
    )
    assert finding.fix == 'internal_port = 8080, or PORT = "3000" in [env].'


def test_lines_inside_a_multiline_string_are_not_keys(tmp_path: Path) -> None:
    fly = edit(
        FLY,
        '  PORT = "8080"\n',
        '  PORT = "8080"\n  NOTE = """\n[http_service]\n  internal_port = 1\n"""\n',
    )
    dockerfile = 'FROM python:3.12\nCMD ["uvicorn", "app:app", "--host", "::", "--port", "8000"]\n'
    finding = only(
        check(make(tmp_path, {"fly.toml": fly, "Dockerfile": dockerfile})), "internal-port-mismatch"
    )
    assert finding.line == line_of(fly, "internal_port = 8080")


#: The end of an app module that serves when run as a script.
RUN_AS_SCRIPT = (
    "\n\nif __name__ == '__main__':\n    import os\n\n    import uvicorn\n\n"
    "    from server import app\n\n"
)


def test_internal_port_other_than_the_apps_run_port_is_an_error(tmp_path: Path) -> None:
    app = (
        APP
        + RUN_AS_SCRIPT
        + "    uvicorn.run(app, host='::', port=int(os.environ.get('PORT', '8000')))\n"
    )
    fly = edit(FLY, 'PORT = "8080"', 'OTHER = "x"')
    finding = only(
        check(make(tmp_path, {"app.py": app, "fly.toml": fly})), "internal-port-mismatch"
    )
    assert "PORT is set nowhere: its default 8000" in finding.what
    assert "app.py uvicorn.run(...)" in finding.what


def test_ports_that_cannot_be_told_say_nothing(tmp_path: Path) -> None:
    app = APP + RUN_AS_SCRIPT + "    uvicorn.run(app, fd=os.dup(3))\n"
    dockerfiles = [
        'FROM python:3.12\nCMD ["uvicorn", "app:app", "--fd", "3"]\n',
        "FROM python:3.12\nCMD uvicorn app:app --host :: --port $APP_PORT\n",
        'FROM python:3.12\nCMD ["hypercorn", "-c", "hypercorn.toml", "app:app"]\n',
        "FROM python:3.12\nCMD pip install uvicorn && ./start-server\n",
    ]
    for dockerfile in dockerfiles:
        assert check(make(tmp_path, {"Dockerfile": dockerfile, "app.py": app})).findings == []


# --- 5. IPv6 for the private network -----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "host", "said"),
    [
        (
            '["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8080"]',
            "0.0.0.0",
            "--host 0.0.0.0",
        ),
        ('["hypercorn", "app:app", "--bind", "0.0.0.0:8080"]', "0.0.0.0", "--bind 0.0.0.0:8080"),
        ('["uvicorn", "app:app", "--port", "8080"]', "127.0.0.1", "no --host: uvicorn's default"),
        ('["python", "app.py"]', "0.0.0.0", "host=0.0.0.0, port=8080"),
    ],
)
def test_listening_on_ipv4_only_is_an_error(
    tmp_path: Path, command: str, host: str, said: str
) -> None:
    app = APP + RUN_AS_SCRIPT + "    app.run(host='0.0.0.0', port=8080)\n"
    files = {"Dockerfile": f"FROM python:3.12\nCMD {command}\n", "app.py": app}
    finding = only(check(make(tmp_path, files)), "not-listening-on-ipv6")
    assert finding.severity == "error"
    assert f"listens on {host} only" in finding.what and said in finding.what
    run_line = line_of(app, "app.run(")
    assert (finding.file, finding.line) == (
        ("app.py", run_line) if "app.py" in command else ("Dockerfile", 2)
    )
    assert ("loopback" in finding.what) == (host == "127.0.0.1")
    assert "--host ::" in finding.fix and "forward_large_bodies=False" in finding.fix


@pytest.mark.parametrize(
    "command",
    [
        "CMD python migrate.py && exec uvicorn app:app --host 0.0.0.0 --port 8080",
        'CMD ["tini", "--", "python", "-m", "uvicorn", "app:app", "--host=0.0.0.0", "--port=8080"]',
        'CMD ["sh", "-c", "uvicorn app:app --host 0.0.0.0 --port ${PORT:-8000}"]',
        # gunicorn's default bind when PORT is set: 0.0.0.0:$PORT
        'CMD ["gunicorn", "app:app", "-k", "uvicorn.workers.UvicornWorker"]',
    ],
)
def test_the_server_is_found_behind_wrappers_and_in_shell_scripts(
    tmp_path: Path, command: str
) -> None:
    report = check(make(tmp_path, {"Dockerfile": f"FROM python:3.12\n{command}\n"}))
    assert ids(report) == ["not-listening-on-ipv6"]  # and port 8080, as internal_port says
    assert "listens on 0.0.0.0 only" in report.findings[0].what


@pytest.mark.parametrize("entrypoint", ['["tini", "--"]', '["./docker-entrypoint.sh"]'])
def test_a_shell_cmd_under_an_exec_entrypoint_is_read(tmp_path: Path, entrypoint: str) -> None:
    # Docker runs ENTRYPOINT ["tini", "--"] + CMD uvicorn ... as tini -- /bin/sh -c "uvicorn ...".
    dockerfile = (
        f"FROM python:3.12\nENTRYPOINT {entrypoint}\n"
        "CMD uvicorn app:app --host 0.0.0.0 --port 8080\n"
    )
    finding = only(check(make(tmp_path, {"Dockerfile": dockerfile})), "not-listening-on-ipv6")
    assert (finding.file, finding.line) == ("Dockerfile", 3)


def test_ipv6_and_dual_stack_hosts_are_fine_and_so_is_no_forwarding(tmp_path: Path) -> None:
    for command in (
        '["uvicorn", "app:app", "--host", "::", "--port", "8080"]',
        '["hypercorn", "app:app", "--bind", "0.0.0.0:8080", "--bind", "[::]:8080"]',
        '["sanic", "app:app", "--host", "fly-local-6pn", "--port", "8080"]',
    ):
        files = {"Dockerfile": f"FROM python:3.12\nCMD {command}\n"}
        assert check(make(tmp_path, files)).findings == [], command
    dockerfile = (
        'FROM python:3.12\nCMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8080"]\n'
    )
    app = config_app(forward_large_bodies="False")
    assert check(make(tmp_path, {"Dockerfile": dockerfile, "app.py": app})).findings == []


# --- 6. Autostop -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ['"stop"', "true"])
def test_autostop_stop_is_a_warning(tmp_path: Path, value: str) -> None:
    fly = edit(FLY, 'auto_stop_machines = "suspend"', f"auto_stop_machines = {value}")
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "autostop-loses-sessions")
    assert finding.severity == "warning" and finding.line == line_of(fly, "auto_stop_machines")
    assert 'auto_stop_machines = "suspend"' in finding.fix and 'owners="started"' in finding.fix


def test_autostop_stop_said_so_is_not_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fly = edit(FLY, 'auto_stop_machines = "suspend"', 'auto_stop_machines = "stop"')
    assert (
        check(make(tmp_path, {"fly.toml": fly, "app.py": config_app(owners='"started"')})).findings
        == []
    )
    accepted = fly + "\n# flysticky: accept autostop-loses-sessions (stateless sessions)\n"
    report = check(make(tmp_path, {"fly.toml": accepted, "app.py": APP}))
    assert report.findings == [] and [f.id for f in report.accepted] == ["autostop-loses-sessions"]
    assert main(["check", "--strict", str(tmp_path)]) == 0
    assert "0 errors, 0 warnings (1 warning accepted in fly.toml)" in capsys.readouterr().out


def test_an_error_cannot_be_accepted(tmp_path: Path) -> None:
    fly = (
        edit(FLY, 'name = "fly-machine-id"', 'name = "sid"')
        + "# flysticky: accept replay-cache-wrong-cookie\n"
    )
    assert ids(check(make(tmp_path, {"fly.toml": fly}))) == ["replay-cache-wrong-cookie"]


# --- 7. Regions --------------------------------------------------------------------------


def test_retired_and_unknown_regions_are_errors(tmp_path: Path) -> None:
    fly = edit(FLY, 'primary_region = "iad"', 'primary_region = "sea"')
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "region-retired")
    assert (finding.severity, finding.line) == ("error", 2)
    assert finding.fix.startswith('primary_region = "sjc"')
    fly = edit(FLY, 'primary_region = "iad"', 'primary_region = "xyz"')
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "region-unknown")
    assert '"xyz"' in finding.what and "ams, arn" in finding.fix
    fly = edit(FLY, 'PORT = "8080"', 'PORT = "8080"\n  PRIMARY_REGION = "bos"')
    finding = only(check(make(tmp_path, {"fly.toml": fly})), "region-retired")
    assert finding.line == line_of(fly, "PRIMARY_REGION") and '"ewr"' in finding.fix


# --- 8. Health checks --------------------------------------------------------------------

FRAMEWORK_APPS = {
    "sanic": """\
from sanic import Sanic
from flysticky import StickyConfig
from flysticky.sanic import StickySessions
app = Sanic("check_sanic")
StickySessions(app, StickyConfig(skipper=lambda request: request.path == "/health"))
""",
    "quart": """\
from quart import Quart
from flysticky import StickyConfig
from flysticky.quart import StickySessions
app = Quart(__name__)
sticky = StickySessions(app, StickyConfig(skipper=lambda request: request.path == "/health"))
""",
    "starlette": """\
from starlette.applications import Starlette
from starlette.middleware import Middleware
from flysticky import StickyConfig
from flysticky.asgi import StickySessions
config = StickyConfig(skipper=lambda request: request.url.path == "/health")
app = Starlette(middleware=[Middleware(StickySessions, config=config)])
""",
    "fastapi": """\
from fastapi import FastAPI
from flysticky import StickyConfig
from flysticky.asgi import StickySessions
app = FastAPI()
app.add_middleware(StickySessions, config=StickyConfig(skipper=lambda r: r.url.path == "/health"))
""",
    "litestar": """\
from litestar import Litestar
from flysticky import StickyConfig
from flysticky.litestar import StickySessions
config = StickyConfig(skipper=lambda request: request.url.path == "/health")
app = Litestar(route_handlers=[], plugins=[StickySessions(config)])
""",
}
ADAPTERS = {
    "sanic": "sanic",
    "quart": "quart",
    "starlette": "asgi",
    "fastapi": "asgi",
    "litestar": "litestar",
}


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_APPS))
def test_skipper_is_asked_with_the_frameworks_own_request(tmp_path: Path, framework: str) -> None:
    # The skippers read request.path or request.url.path: only the real request object
    # answers; /health is skipped and /healthz is not.
    fly = FLY + HEALTH + HEALTH.replace("/health", "/healthz")
    report = check(make(tmp_path, {"fly.toml": fly, "app.py": FRAMEWORK_APPS[framework]}))
    assert report.config_source is not None
    assert f"(flysticky.{ADAPTERS[framework]}.StickySessions)" in report.config_source
    finding = only(report, "health-check-not-skipped")
    assert len(report.findings) == 1 and finding.line == line_of(fly, 'path = "/healthz"')
    attribute = "request.path" if framework in ("sanic", "quart") else "request.url.path"
    assert finding.fix == f'skipper=lambda request: {attribute} == "/healthz"'


def test_health_check_fix_for_a_plain_asgi_app_reads_the_scope(tmp_path: Path) -> None:
    fly = FLY + HEALTH.replace("/health", "/healthz")
    report = check(make(tmp_path, {"fly.toml": fly, "app.py": asgi_app()}))
    finding = only(report, "health-check-not-skipped")
    assert finding.fix == 'skipper=lambda scope: scope["path"] == "/healthz"'
    app = asgi_app(skipper=finding.fix.removeprefix("skipper="))
    assert check(make(tmp_path, {"app.py": app})).findings == []


def test_health_check_without_a_skipper_is_a_warning(tmp_path: Path) -> None:
    finding = only(check(make(tmp_path, {"fly.toml": FLY + HEALTH})), "health-check-not-skipped")
    assert finding.severity == "warning" and "(there is none)" in finding.what
    assert "no cookie" in finding.why


def test_health_check_routed_by_key_is_an_error(tmp_path: Path) -> None:
    fly = FLY + HEALTH.replace("/health", "/rooms/health")
    finding = only(
        check(make(tmp_path, {"fly.toml": fly, "app.py": asgi_app(key=ROOMS)})),
        "health-check-routed-away",
    )
    assert finding.severity == "error" and "the key 'health'" in finding.what


def test_a_skipper_that_cannot_be_asked_is_a_warning_not_a_guess(tmp_path: Path) -> None:
    # A config with no app beside it: which request object would its skipper get?
    app = config_app(skipper="lambda request: request.path == '/health'")
    finding = only(
        check(make(tmp_path, {"fly.toml": FLY + HEALTH, "app.py": app})), "health-check-unevaluated"
    )
    assert (
        finding.severity == "warning"
        and "no one Sanic, Quart, Starlette or Litestar app" in finding.what
    )
    # A skipper that raises on the request it gets (a scope has no .url).
    raising = "lambda scope: scope.url.path == '/health'"
    finding = only(
        check(make(tmp_path, {"fly.toml": FLY + HEALTH, "app.py": asgi_app(skipper=raising)})),
        "health-check-unevaluated",
    )
    assert "StickyConfig.skipper raised AttributeError" in finding.what


# --- 9. Metrics --------------------------------------------------------------------------

METRICS = '\n[metrics]\n  port = 9091\n  path = "/metrics"\n'


@pytest.mark.parametrize(
    ("metrics", "config", "expected", "severity"),
    [
        (METRICS, "None", "metrics-not-served", "warning"),
        ("", "9091", "metrics-not-scraped", "warning"),
        (edit(METRICS, "9091", "9092"), "9091", "metrics-mismatch", "error"),
        (edit(METRICS, '"/metrics"', '"/stats"'), "9091", "metrics-mismatch", "error"),
        ("", "8080", "metrics-port-is-app-port", "error"),
        (METRICS, "9091", None, None),
    ],
)
def test_metrics_agree_with_fly_toml(
    tmp_path: Path, metrics: str, config: str, expected: str | None, severity: str | None
) -> None:
    files = {"fly.toml": FLY + metrics, "app.py": config_app(metrics_port=config)}
    report = check(make(tmp_path, files))
    if expected is None:
        assert report.findings == []
        return
    finding = only(report, expected)
    assert finding.severity == severity
    if expected == "metrics-mismatch":
        assert finding.fix == '[metrics]\n  port = 9091\n  path = "/metrics"'


# --- Finding the app and its config ------------------------------------------------------


def test_config_read_from_the_module_the_command_names(tmp_path: Path) -> None:
    service = asgi_app(cookie_name='"pin"').replace("app = StickySessions", "api = StickySessions")
    command = '["uvicorn", "service.main:api", "--host", "::", "--port", "8080"]'
    files = {
        "app.py": None,
        "service/__init__.py": "",
        "service/main.py": service,
        "Dockerfile": f"FROM python:3.12\nCMD {command}\n",
        "fly.toml": edit(FLY, 'name = "fly-machine-id"', 'name = "pin"'),
    }
    report = check(make(tmp_path, files))
    assert report.config_source == "service/main.py, `api` (flysticky.asgi.StickySessions)"
    assert report.findings == []


def test_config_read_from_a_fly_process(tmp_path: Path) -> None:
    processes = (
        '\n[processes]\n  app = "sanic server:app --host :: --port 8080"\n'
        '  worker = "python worker.py"\n'
    )
    files = {
        "app.py": None,
        "server.py": config_app(cookie_name='"pin"'),
        "fly.toml": edit(FLY, 'name = "fly-machine-id"', 'name = "pin"') + processes,
    }
    report = check(make(tmp_path, files))
    assert report.findings == [] and report.config_source == "server.py, `config` (a StickyConfig)"


def test_no_config_is_a_finding_and_the_defaults_are_checked(tmp_path: Path) -> None:
    fly = edit(FLY, 'name = "fly-machine-id"', 'name = "pin"')
    report = check(make(tmp_path, {"fly.toml": fly, "app.py": "VALUE = 1\n"}))
    assert ids(report) == ["replay-cache-wrong-cookie", "config-not-found"]
    assert "StickyConfig was not read" in report.findings[0].what
    assert "StickySessions(app" in report.findings[1].fix
    assert report.config_source is None


def test_no_app_module_is_a_finding(tmp_path: Path) -> None:
    report = check(make(tmp_path, {"app.py": None, "Dockerfile": None}))
    assert ids(report) == ["app-not-found"]


def test_an_app_that_raises_at_import_is_a_finding_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = "import os\n\nSECRET = os.environ['NO_SUCH_SECRET_XYZ']\n"
    finding = only(check(make(tmp_path, {"app.py": app})), "app-import-failed")
    assert (finding.file, finding.line) == ("app.py", 3)
    assert "KeyError: 'NO_SUCH_SECRET_XYZ'" in finding.what
    make(tmp_path, {"app.py": "def broken(:\n"})
    finding = only(check(tmp_path), "app-import-failed")
    assert "SyntaxError" in finding.what and (finding.file, finding.line) == ("app.py", 1)
    assert main(["check", str(tmp_path)]) == 0  # a warning: the check could not read it
    out = capsys.readouterr()
    assert (
        "Traceback" not in out.out + out.err and "app.py:1: warning [app-import-failed]" in out.out
    )


def test_a_module_that_serves_at_import_is_never_imported(tmp_path: Path) -> None:
    app = (
        "open('imported', 'w').close()\n"
        + asgi_app()
        + "\nimport uvicorn\n\nuvicorn.run(app, host='::', port=8080)\n"
    )
    finding = only(check(make(tmp_path, {"app.py": app})), "app-starts-server-at-import")
    assert finding.line == app.splitlines().index("uvicorn.run(app, host='::', port=8080)") + 1
    assert "uvicorn.run(...)" in finding.what and '__name__ == "__main__"' in finding.fix
    assert not tmp_path.joinpath("imported").exists()


def test_a_module_that_blocks_at_import_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    app = (
        "import os, socket, time\n\nopen('pid', 'w').write(str(os.getpid()))\n"
        "server = socket.create_server(('127.0.0.1', 0))\nwhile True:\n    time.sleep(0.05)\n"
    )
    started = time.monotonic()
    finding = only(check(make(tmp_path, {"app.py": app}), timeout=1), "app-import-timeout")
    assert time.monotonic() - started < 10
    assert "within 1 s" in finding.what and "--timeout" in finding.fix
    with pytest.raises(ProcessLookupError):
        os.kill(int(tmp_path.joinpath("pid").read_text()), 0)


def test_the_app_is_imported_off_fly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", "0123456789abcd")
    app = "import os\n\nassert 'FLY_MACHINE_ID' not in os.environ\n\n" + APP
    assert check(make(tmp_path, {"app.py": app})).findings == []


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that no one has reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def _ended(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


#: Apps that start something at import and still import: their config is read at once, and
#: what they started is ended with the probe (a forked or spawned "server" too).
STARTS_AT_IMPORT = {
    "fork": "import os, time\n\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n"
    "    os._exit(0)\nopen('started', 'w').write(str(pid))\n",
    "spawn": "import subprocess, sys\n\nchild = subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(60)'])\nopen('started', 'w').write(str(child.pid))\n",
    "thread-and-closed-stdout": "import sys, threading, time\n\nsys.stdout.close()\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n",
    "object-that-refuses-to-be-looked-at": "class Odd:\n    @property\n"
    "    def __class__(self):\n        raise RuntimeError('no')\n\n\nodd = Odd()\n",
}


@pytest.mark.parametrize("start", sorted(STARTS_AT_IMPORT))
def test_what_the_app_starts_at_import_is_ended_and_its_config_read(
    tmp_path: Path, start: str
) -> None:
    started = time.monotonic()
    report = check(make(tmp_path, {"app.py": STARTS_AT_IMPORT[start] + APP}), timeout=5)
    assert (report.findings, report.config_source) == ([], "app.py, `config` (a StickyConfig)")
    assert time.monotonic() - started < 5
    if tmp_path.joinpath("started").exists():
        assert _ended(int(tmp_path.joinpath("started").read_text()))


def test_a_daemon_the_app_forks_at_import_does_not_hold_the_check(tmp_path: Path) -> None:
    # It leaves the probe's process group (setsid), so it outlives the probe: the check does
    # not wait for it.
    app = (
        "import os, time\n\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
        "    time.sleep(30)\n    os._exit(0)\nopen('daemon', 'w').write(str(pid))\n" + APP
    )
    started = time.monotonic()
    try:
        report = check(make(tmp_path, {"app.py": app}), timeout=2)
        assert time.monotonic() - started < 10
        assert report.config_source == "app.py, `config` (a StickyConfig)"
    finally:
        os.kill(int(tmp_path.joinpath("daemon").read_text()), signal.SIGKILL)


def test_a_package_is_read_before_a_module_of_the_same_name(tmp_path: Path) -> None:
    # `import app` imports app/__init__.py, not app.py: it is the one read, and not imported.
    package = (
        "open('imported', 'w').close()\n" + asgi_app() + "\nimport uvicorn\n\nuvicorn.run(app)\n"
    )
    report = check(make(tmp_path, {"app/__init__.py": package}), timeout=5)
    finding = only(report, "app-starts-server-at-import")
    assert finding.file == "app/__init__.py" and not tmp_path.joinpath("imported").exists()


def test_the_projects_own_modules_do_not_stand_in_for_the_checks(tmp_path: Path) -> None:
    files = {
        "flysticky.py": "raise SystemExit('the project has a flysticky.py')\n",
        "json.py": "raise RuntimeError('the project has a json.py')\n",
    }
    report = check(make(tmp_path, files))
    assert (report.findings, report.config_source) == ([], "app.py, `config` (a StickyConfig)")


def test_an_app_killed_by_a_signal_at_import_says_which(tmp_path: Path) -> None:
    app = "import os, signal\n\nos.kill(os.getpid(), signal.SIGTERM)\n"
    finding = only(check(make(tmp_path, {"app.py": app})), "app-import-failed")
    assert "failed: killed by SIGTERM: no output" in finding.what


def test_a_module_too_deep_to_parse_is_a_finding(tmp_path: Path) -> None:
    app = APP + "total = " + " + ".join(["1"] * 100_000) + "\n"
    assert ids(check(make(tmp_path, {"app.py": app}))) == ["app-import-failed"]


def test_thousands_of_health_checks_are_all_asked(tmp_path: Path) -> None:
    fly = FLY + "".join(HEALTH.replace("/health", f"/health/{i:05}") for i in range(10_000))
    report = check(make(tmp_path, {"fly.toml": fly}))
    assert ids(report) == ["health-check-not-skipped"] * 10_000


# --- Odd projects: a finding or a one-line error, never a traceback -------------------------


@pytest.mark.parametrize(
    ("fly", "expected"),
    [
        (
            FLY + "\n[[services]]\n  internal_port = 8080\n  [[services.ports]]\n"
            "    port = 443\n    handlers = 5\n",
            [],
        ),
        (edit(FLY, "internal_port = 8080", "internal_port = [8080]"), []),
        (FLY + '\n[checks.alive]\n  type = "http"\n  port = [8080]\n  path = "/h"\n', []),
        (
            edit(
                edit(FLY, 'name = "fly-machine-id"', "name = 1979-05-27T07:32:00Z"),
                "ttl_seconds = 300",
                "ttl_seconds = 07:32:00",
            ),
            ["replay-cache-wrong-cookie", "replay-cache-ttl-too-short"],
        ),
        (
            'app = "chéck"\nprimary_region = "iad"\n'
            'http_service = { internal_port = 8080, auto_stop_machines = "suspend", http_options '
            '= { replay_cache = [{ path_prefix = "/", ttl_seconds = 300, type = "cookie", '
            'name = "fly-machine-id" }] } }\nenv.PORT = "8080"  # ünïcödé\n',
            [],
        ),
    ],
    ids=["handlers-not-a-list", "internal-port-a-list", "check-port-a-list", "dates", "inline"],
)
def test_odd_fly_toml_values_are_findings_not_tracebacks(
    tmp_path: Path, fly: str, expected: list[str]
) -> None:
    report = check(make(tmp_path, {"fly.toml": fly}))
    assert ids(report) == expected
    if expected:
        assert "1979-05-27 07:32:00+00:00" in report.findings[0].what


@pytest.mark.parametrize(
    "command",
    [
        '["uvicorn", "app:app", "--host", "::", "--port", "²"]',
        '["uvicorn", "app:app", "--host", "::", "--port", "' + "9" * 5000 + '"]',
        '["python", ".."]',
    ],
    ids=["superscript", "5000-digits", "python-dotdot"],
)
def test_odd_commands_say_nothing_they_cannot_tell(tmp_path: Path, command: str) -> None:
    files = {"Dockerfile": f"FROM python:3.12\nCMD {command}\n"}
    assert check(make(tmp_path, files)).findings == []


def test_a_fly_toml_nested_too_deeply_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path, {"fly.toml": FLY + "deep = " + "[" * 5000 + "]" * 5000 + "\n"})
    assert main(["check", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/fly.toml: nested too deeply to read\n"


def test_a_path_in_a_symlink_loop_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.joinpath("loop").symlink_to("loop")
    assert main(["check", str(tmp_path / "loop")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/loop: cannot be resolved") and err.count("\n") == 1


def test_an_unreadable_dockerfile_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    read_text = Path.read_text

    def refuse(path: Path, *args: object, **kwargs: object) -> str:
        if path.name == "Dockerfile":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", refuse)
    assert main(["check", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/Dockerfile: cannot read it: Permission denied\n"


def test_a_report_stdout_cannot_encode_is_escaped(tmp_path: Path) -> None:
    fly = FLY + HEALTH.replace("/health", "/sant\u00e9")
    result = subprocess.run(
        [sys.executable, "-m", "flysticky.cli", "check", str(make(tmp_path, {"fly.toml": fly}))],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert "health check on /sant\\xe9 is not skipped" in result.stdout


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "flysticky.cli", "check", str(make(tmp_path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `flysticky check | head -1`, with head gone before the report
    assert (process.stderr.read(), process.wait(timeout=60)) == (b"", 0)


# --- The command line --------------------------------------------------------------------


def test_json_report_has_the_documented_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fly = edit(edit(FLY, 'name = "fly-machine-id"', 'name = "sid"'), '"suspend"', '"stop"')
    assert main(["check", "--json", str(make(tmp_path, {"fly.toml": fly}))]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["path", "findings", "errors", "warnings"]
    assert (report["path"], report["errors"], report["warnings"]) == (str(tmp_path.resolve()), 1, 1)
    for finding in report["findings"]:
        assert list(finding) == ["id", "severity", "file", "line", "what", "why", "fix"]
    assert [f["id"] for f in report["findings"]] == [
        "replay-cache-wrong-cookie",
        "autostop-loses-sessions",
    ]
    assert report["findings"][0]["line"] == line_of(fly, 'name = "sid"')


def test_human_report_has_a_block_per_finding_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fly = edit(FLY, 'name = "fly-machine-id"', 'name = "sid"')
    assert main(["check", str(make(tmp_path, {"fly.toml": fly}))]) == 1
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert blocks[0].splitlines() == [
        f"flysticky check {tmp_path.resolve()}",
        "  StickyConfig: app.py, `config` (a StickyConfig)",
    ]
    line = line_of(fly, 'name = "sid"')
    assert blocks[1].startswith(
        f"fly.toml:{line}: error [replay-cache-wrong-cookie]\n  [[http_service"
    )
    assert "\n  why: " in blocks[1] and blocks[1].endswith('\n  fix: name = "fly-machine-id"')
    assert blocks[-1] == "1 error, 0 warnings"


def test_exit_status_warnings_pass_unless_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fly = edit(FLY, '"suspend"', '"stop"')
    make(tmp_path, {"fly.toml": fly})
    assert main(["check", str(tmp_path)]) == 0
    assert main(["check", "--strict", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("0 errors, 1 warning") == 2


def test_path_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(make(tmp_path))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.endswith("0 errors, 0 warnings\n")


@pytest.mark.parametrize(
    ("fly", "message"),
    [
        (None, "no fly.toml here"),
        ('app = "x"\n[http_service\ninternal_port = 8080\n', "not valid TOML"),
        (b"\xff\xfe", "not valid TOML"),
    ],
)
def test_a_path_that_is_not_a_fly_project_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fly: str | bytes | None, message: str
) -> None:
    if isinstance(fly, bytes):
        tmp_path.joinpath("fly.toml").write_bytes(fly)
    elif fly is not None:
        tmp_path.joinpath("fly.toml").write_text(fly)
    assert main(["check", "--json", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and message in out.err and "Traceback" not in out.err
    assert out.err.startswith(f"error: {tmp_path}")
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
