"""The cookiecutter template: every variant generated, linted, tested and started, and the
generated project installed from its own files as Docker would install it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.main import cookiecutter
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import flysticky
from flysticky.cli import main as flysticky_main
from flysticky.proxy.flytoml import Metrics
from flysticky.proxy.flytoml import load as load_fly_toml
from flysticky.vendoring import write_wheel

from .fly_schema import duration_seconds, problems

ROOT = Path(__file__).parent.parent
TEMPLATE = ROOT / "template"
BIN = Path(sys.executable).parent
OFFERED_PYTHONS: list[str] = json.loads(TEMPLATE.joinpath("cookiecutter.json").read_text())[
    "python_version"
]
RUNNING_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
MACHINE_ID = "0123456789abcd"
FRAMEWORKS: list[str] = json.loads(TEMPLATE.joinpath("cookiecutter.json").read_text())["framework"]
#: The flysticky module each framework's app imports StickySessions from.
ADAPTERS = {"sanic": "sanic", "quart": "quart", "fastapi": "asgi"}
VARIANTS = {
    "sanic-default": {"framework": "sanic"},
    "quart-default": {"framework": "quart"},
    "fastapi-default": {"framework": "fastapi"},
    "sanic-unusual": {
        "framework": "sanic",
        "project_name": 'Ünïcode "Démo" \\ 2',
        "project_slug": "unicode_demo_2",
        "fly_app_name": "x-1",
        "primary_region": "syd",
        "cookie_name": "sticky.pin",
        "python_version": "3.13",
    },
    "quart-unusual": {
        "framework": "quart",
        "project_name": 'a\'"""\\',
        "fly_app_name": "a0",
        "primary_region": "gru",
        "cookie_name": "__pin's",
        "python_version": "3.11",
        "flysticky_requirement": "flysticky>=0.1",
    },
    "fastapi-unusual": {
        "framework": "fastapi",
        "project_name": "Fast <API> & {co}",
        "fly_app_name": "f-a-s-t",
        "primary_region": "nrt",
        "cookie_name": "pin|1~x",
        "python_version": "3.13",
        "flysticky_requirement": "flysticky~=0.1",
    },
}


def generate(tmp_path: Path, answers: dict[str, str]) -> Path:
    return Path(
        cookiecutter(str(TEMPLATE), no_input=True, extra_context=answers, output_dir=str(tmp_path))
    )


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    answers = VARIANTS[request.param]
    path = generate(tmp_path_factory.mktemp(request.param), answers)
    path.joinpath(".variant.json").write_text(json.dumps(answers))
    return path


def answers_of(project: Path) -> dict[str, str]:
    return json.loads(project.joinpath(".variant.json").read_text())  # type: ignore[no-any-return]


def files_of(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_framework_choices_match_the_apps_in_the_template() -> None:
    apps = sorted(p.name.removesuffix("_app.py") for p in TEMPLATE.glob("*/*_app.py"))
    assert apps == sorted(FRAMEWORKS) == sorted(ADAPTERS)
    tests = sorted(p.name for p in TEMPLATE.glob("*/tests/test_*.py"))
    assert tests == sorted(["test_page.py", *(f"test_{each}.py" for each in FRAMEWORKS)])


def test_only_the_chosen_framework_and_nothing_unrendered(project: Path) -> None:
    framework = answers_of(project)["framework"]
    others = [other for other in FRAMEWORKS if other != framework]
    names = files_of(project)
    assert "app.py" in names and "tests/test_app.py" in names and ".gitignore" in names
    assert not any(other in name for name in names for other in others)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    app = project.joinpath("app.py").read_text()
    assert f"from flysticky.{ADAPTERS[framework]} import StickySessions" in app
    assert not any(other in app.lower() for other in others)
    for path in project.rglob("*"):
        if path.is_file() and path.name != ".variant.json" and path.suffix != ".whl":
            text = path.read_text()
            assert "{{" not in text.replace("{{ ", "") or path.suffix == ".html"
            assert "cookiecutter" not in text, path
            assert "{%" not in text, path


def test_flysticky_comes_from_the_answer(project: Path) -> None:
    answers = answers_of(project)
    framework = answers["framework"]
    lines = [
        line
        for line in project.joinpath("requirements.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    dockerfile = project.joinpath("Dockerfile").read_text()
    # Plain uvicorn (the fastapi extra's) serves no websocket without a websocket library.
    extra = ["websockets>=13"] if framework == "fastapi" else []
    requirement = answers.get("flysticky_requirement", "vendor")
    if requirement == "vendor":
        wheel = f"flysticky-{flysticky.__version__}-py3-none-any.whl"
        assert lines == [*extra, f"./vendor/{wheel}[{framework},metrics]"]
        assert files_of(project / "vendor") == [wheel]
        # Docker copies the wheel before the install that needs it.
        assert dockerfile.index("COPY vendor/ vendor/") < dockerfile.index("RUN pip install")
    else:
        assert lines == [
            *extra,
            f"flysticky[{framework},metrics]{requirement.removeprefix('flysticky')}",
        ]
        assert not project.joinpath("vendor").exists() and "vendor" not in dockerfile


def test_generated_tests_pass_in_this_venv(project: Path) -> None:
    """Quick: every variant's tests, with this venv's packages (the Docker-like tests below
    run them with the project's own requirements)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\d+ passed", result.stdout)


def test_generated_code_is_ruff_clean(project: Path) -> None:
    for command in (["check", "--select", "E,F,W,I,B,UP"], ["format", "--check", "--diff"]):
        result = subprocess.run(
            [str(BIN / "ruff"), *command, "--no-cache", "."],
            cwd=project,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True)


def test_dockerfile_passes_hadolint(project: Path) -> None:
    result = hadolint(project / "Dockerfile")
    assert result.returncode == 0, result.stdout
    text = project.joinpath("Dockerfile").read_text()
    assert f"FROM python:{answers_of(project).get('python_version', '3.12')}-slim" in text
    assert "--no-cache-dir" in text and re.search(r"^USER \d+", text, re.M)


def test_root_dockerfile_passes_hadolint() -> None:
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout


def test_fly_toml_holds_what_flyctl_knows_and_fly_requires(project: Path) -> None:
    answers = answers_of(project)
    config = tomllib.loads(project.joinpath("fly.toml").read_text())
    assert problems(config) == []
    if "fly_app_name" in answers:
        assert config["app"] == answers["fly_app_name"]
    assert config["primary_region"] == answers.get("primary_region", "iad")
    service = config["http_service"]
    assert service["checks"][0]["path"] == "/health"
    # Sticky sessions live in memory: a suspended machine keeps it, a stopped one loses it.
    assert service["auto_stop_machines"] == "suspend"
    # Rolling keeps machine ids, so pins survive a deploy; bluegreen would destroy them.
    assert config["deploy"]["strategy"] == "rolling"
    (rule,) = service["http_options"]["replay_cache"]
    assert rule["name"] == answers.get("cookie_name", "fly-machine-id")
    assert rule["type"] == "cookie" and rule["path_prefix"] == "/"
    emulated = load_fly_toml(project / "fly.toml")  # what the local emulator honours
    assert emulated.cache_rules[0].name == rule["name"]
    assert emulated.autostop.stop == "suspend"
    # Fly scrapes flysticky's metrics where the app serves them.
    assert config["metrics"] == {"port": 9091, "path": "/metrics"}
    assert emulated.metrics == Metrics(9091, "/metrics")
    page = project.joinpath("page.py").read_text()
    assert re.search(r"^METRICS_PORT = (\d+)$", page, re.M).group(1) == "9091"  # type: ignore[union-attr]
    assert "metrics_port=page.METRICS_PORT" in project.joinpath("app.py").read_text()


def test_default_fly_app_name_is_unique_and_the_readme_points_at_it(tmp_path: Path) -> None:
    first = generate(tmp_path / "1", {})
    second = generate(tmp_path / "2", {})
    names = [tomllib.loads(p.joinpath("fly.toml").read_text())["app"] for p in (first, second)]
    assert all(re.fullmatch(r"sticky-demo-[a-z]{6}", name) for name in names)
    assert names[0] != names[1]
    assert f"https://{names[0]}.fly.dev/" in first.joinpath("README.md").read_text()


def test_root_fly_toml_is_the_demo_template_rendered(tmp_path: Path) -> None:
    config = tomllib.loads(ROOT.joinpath("fly.toml").read_text())
    assert problems(config) == []
    demo = generate(tmp_path, demo_answers(ROOT / "Dockerfile"))
    assert config == tomllib.loads(demo.joinpath("fly.toml").read_text())


def test_schema_check_catches_what_flyctl_rejects() -> None:
    config = tomllib.loads(ROOT.joinpath("fly.toml").read_text())
    config["http_service"]["interal_port"] = 1
    config["http_service"]["http_options"]["replay_cache"][0]["ttl_seconds"] = 5
    config["app"] = "Bad_Name"
    config["kill_timeout"] = "10m"
    config["vm"][0]["memory"] = "4gb"
    config["deploy"]["stratgy"] = "rolling"
    found = " ".join(problems(config))
    assert "interal_port is not a key" in found
    assert "ttl_seconds: at least 10" in found
    assert "app='Bad_Name'" in found
    assert "kill_timeout='10m': 1 to 300 seconds" in found
    assert "suspend needs 2 GB or less" in found
    assert "deploy.stratgy is not a key" in found


# --- Started as the Dockerfile starts it ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_as_dockerfile_says(
    directory: Path, dockerfile: Path, python: Path, port: int, host: str | None = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.M)
    assert cmd, "the Dockerfile needs an exec-form CMD"
    argv = json.loads(cmd.group(1))
    assert argv[0] == "python"
    # HOST keeps the test on loopback; the image (no HOST) listens on every IPv4 and IPv6
    # address.
    env = {k: v for k, v in os.environ.items() if k != "HOST"}
    env.update({"PORT": str(port), "FLY_MACHINE_ID": MACHINE_ID})
    if host is not None:
        env["HOST"] = host
    return subprocess.Popen(
        [str(python), *argv[1:]],
        cwd=directory,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def fetch(url: str, deadline: float) -> tuple[int, str, Any]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode(), response.headers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def check_rooms(port: int) -> None:
    """Two websockets in a room see each other's messages; bad names are refused."""
    base = f"127.0.0.1:{port}/rooms"
    status, body, _ = fetch(f"http://{base}/lobby", time.monotonic() + 10)
    assert status == 200 and json.loads(body)["room"] == "lobby"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{base}/No%3Cb%3E", timeout=5)
    assert refused.value.code == 400 and b"lowercase" in refused.value.read()
    with (
        connect(f"ws://{base}/lobby/ws", open_timeout=10) as first,
        connect(f"ws://{base}/lobby/ws", open_timeout=10) as second,
    ):
        hello = json.loads(first.recv(timeout=10))
        assert hello["type"] == "joined" and hello["machine"] == MACHINE_ID
        assert json.loads(second.recv(timeout=10))["type"] == "joined"
        first.send("hello <b>room</b>")
        for ws in (first, second):
            message = json.loads(ws.recv(timeout=10))
            assert message["text"] == "hello <b>room</b>" and message["from"] == hello["you"]
    with connect(f"ws://{base}/Bad_Name/ws", open_timeout=10) as bad:
        assert "lowercase" in json.loads(bad.recv(timeout=10))["error"]
        with pytest.raises(ConnectionClosed) as closed:
            bad.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def serve_and_check(directory: Path, dockerfile: Path, python: Path) -> None:
    """/ stamped and /health answered, the rooms; then Fly's kill_signal with websockets
    open: they are closed cleanly and the process exits within kill_timeout."""
    config = tomllib.loads(directory.joinpath("fly.toml").read_text())
    assert config["env"]["PORT"] == str(config["http_service"]["internal_port"])
    cookie = config["http_service"]["http_options"]["replay_cache"][0]["name"]
    kill_timeout = duration_seconds(config["kill_timeout"])
    assert kill_timeout is not None
    port = free_port()
    process = start_as_dockerfile_says(directory, dockerfile, python, port)
    try:
        deadline = time.monotonic() + 30
        status, body, headers = fetch(f"http://127.0.0.1:{port}/", deadline)
        assert status == 200
        assert MACHINE_ID in body and "Visits this session" in body
        assert any(c.startswith(f"{cookie}={MACHINE_ID};") for c in headers.get_all("set-cookie"))
        assert fetch(f"http://127.0.0.1:{port}/health", deadline)[1] == "ok"
        check_rooms(port)
        with (
            connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws,
            connect(f"ws://127.0.0.1:{port}/rooms/lobby/ws", open_timeout=10) as room,
        ):
            assert MACHINE_ID in str(ws.recv(timeout=10))
            assert MACHINE_ID in str(room.recv(timeout=10))
            sent = time.monotonic()
            process.send_signal(getattr(signal, config["kill_signal"]))
            for each in (ws, room):
                with pytest.raises(ConnectionClosed) as closed:
                    each.recv(timeout=kill_timeout)
                # 1000 (Sanic) or 1001 (going away): the page's script reconnects either way.
                assert closed.value.rcvd is not None and closed.value.rcvd.code in (1000, 1001)
        assert process.wait(timeout=kill_timeout - (time.monotonic() - sent)) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_dockerfile_start_command_serves_the_page(project: Path) -> None:
    serve_and_check(project, project / "Dockerfile", Path(sys.executable))


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="this host has no IPv6")
def test_without_host_the_app_listens_on_ipv4_and_ipv6(project: Path) -> None:
    """Fly's private network is IPv6 only: with no HOST (as in the image) one dual-stack
    socket takes both."""
    port = free_port()
    process = start_as_dockerfile_says(
        project, project / "Dockerfile", Path(sys.executable), port, host=None
    )
    try:
        deadline = time.monotonic() + 30
        for url in (f"http://127.0.0.1:{port}/health", f"http://[::1]:{port}/health"):
            assert fetch(url, deadline)[1] == "ok"
    finally:
        # Killed, not stopped: the stop on Fly's kill_signal is serve_and_check's, which
        # sends it once the app has served much more. Sent this early, a SIGINT can land
        # while Sanic (on uvloop) is between its startup steps, where uvloop listens for
        # no signal, and it is lost: the app then serves until the next one.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def demo_answers(dockerfile: Path) -> dict[str, str]:
    run = re.search(r"flysticky new (.*?)(?: \\)?$", dockerfile.read_text(), re.M)
    assert run
    args = [arg for arg in shlex.split(run.group(1)) if "=" in arg and not arg.startswith("-")]
    return dict(arg.split("=", 1) for arg in args)


def test_root_dockerfile_renders_and_serves_the_demo(tmp_path: Path) -> None:
    """The root image: `flysticky new` in a first stage, then the generated project's own
    install steps; here with this venv's packages (the Docker-like test below does the rest)."""
    dockerfile = ROOT / "Dockerfile"
    text = dockerfile.read_text()
    run = re.search(r"(flysticky new .*?)(?: \\)?$", text, re.M)
    assert run
    argv = shlex.split(run.group(1))
    argv[argv.index("--output-dir") + 1] = str(tmp_path)
    assert flysticky_main(argv[1:]) == 0
    (demo,) = tmp_path.iterdir()
    assert (
        "COPY --from=generate" in text
        and "RUN pip install --no-cache-dir -r requirements.txt" in text
    )
    assert files_of(demo / "vendor") == [f"flysticky-{flysticky.__version__}-py3-none-any.whl"]
    shutil.copy(ROOT / "fly.toml", demo / "fly.toml")
    serve_and_check(demo, dockerfile, Path(sys.executable))


# --- Installed from its own files, as `docker build` would -------------------------------


def interpreter(version: str) -> Path | None:
    """A working python<version> from pyenv or PATH; None when this machine has none."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(root.glob(f"versions/{version}.*/bin/python"), reverse=True)
    on_path = shutil.which(f"python{version}")
    for candidate in [*candidates, *([Path(on_path)] if on_path else [])]:
        # A pyenv shim for a version pyenv has not selected exits with 127: not a Python.
        if subprocess.run([str(candidate), "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def pip_install(venv: Path, project: Path, requirements: str) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", requirements],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env=isolated_env(venv),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def isolated_env(venv: Path) -> dict[str, str]:
    """This process's environment minus what would let the venv see the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_as_docker_would(tmp_path: Path, framework: str, python_version: str) -> None:
    """A fresh venv that sees only the generated project's files: `pip install -r
    requirements.txt` (the Dockerfile's RUN), the Dockerfile's CMD, then the project's own
    tests with requirements-dev.txt."""
    python = interpreter(python_version)
    if python is None:
        pytest.skip(f"no Python {python_version} on this machine")
    generated = generate(
        tmp_path / "generated", {"framework": framework, "python_version": python_version}
    )
    project = tmp_path / "image" / "app"  # nothing outside this directory is needed
    shutil.copytree(generated, project)
    venv = tmp_path / "image" / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, env=isolated_env(venv))
    pip_install(venv, project, "requirements.txt")
    (direct_url,) = venv.glob("lib/python*/site-packages/flysticky-*.dist-info/direct_url.json")
    assert json.loads(direct_url.read_text())["url"].startswith((project / "vendor").as_uri())
    serve_and_check(project, project / "Dockerfile", venv / "bin" / "python")

    pip_install(venv, project, "requirements-dev.txt")
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env=isolated_env(venv),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_installs_from_its_own_files_and_serves_on_this_python(
    tmp_path: Path, framework: str
) -> None:
    if RUNNING_PYTHON not in OFFERED_PYTHONS:
        pytest.skip(f"the template does not offer Python {RUNNING_PYTHON}")
    check_as_docker_would(tmp_path, framework, RUNNING_PYTHON)


@pytest.mark.template_matrix
@pytest.mark.parametrize("python_version", OFFERED_PYTHONS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_installs_from_its_own_files_and_serves_on_every_offered_python(
    tmp_path: Path, framework: str, python_version: str
) -> None:
    check_as_docker_would(tmp_path, framework, python_version)


# --- Answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"fly_app_name": "My_App"}, "fly_app_name='My_App': Fly app names are lowercase"),
        ({"fly_app_name": "-edge"}, "fly_app_name='-edge'"),
        ({"primary_region": "xyz"}, "primary_region: 'xyz' is not a Fly.io region; live regions:"),
        ({"primary_region": "sea"}, "region 'sea' is retired on Fly.io: use 'sjc' instead"),
        ({"primary_region": "hkg"}, "use 'sin' instead"),
        ({"project_slug": "1abc"}, "project_slug='1abc': use a lowercase ASCII Python identifier"),
        ({"project_name": "two\nlines"}, "project_name='two\\nlines': one line"),
        ({"cookie_name": "a b"}, "cookie_name='a b': a cookie name"),
        ({"flysticky_requirement": "django"}, "flysticky_requirement='django': vendor"),
        ({"flysticky_requirement": "flysticky>=1\nx"}, "flysticky_requirement="),
    ],
)
def test_bad_answers_are_refused_and_nothing_is_written(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], answers: dict[str, str], message: str
) -> None:
    with pytest.raises(FailedHookException):
        generate(tmp_path, answers)
    assert message in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_python_version_is_a_choice_of_the_offered_ones(tmp_path: Path) -> None:
    assert OFFERED_PYTHONS == ["3.12", "3.13", "3.11"]  # the first is the default
    with pytest.raises(ValueError, match=r"2\.7 provided for choice variable python_version"):
        generate(tmp_path, {"python_version": "2.7"})


def test_template_beside_a_checkout_uses_that_checkout(tmp_path: Path) -> None:
    """`cookiecutter template/` from a checkout vendors the checkout's flysticky, even when
    the Python running cookiecutter imports another one; with no flysticky at all, one line
    says what to do."""
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "flysticky", checkout / "flysticky", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(TEMPLATE, checkout / "template", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout)
    init = checkout / "flysticky" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{flysticky.__version__}"', '"9.9.9"'))
    shadow = tmp_path / "shadow" / "flysticky"  # an importable flysticky that is not this one
    shadow.mkdir(parents=True)
    shadow.joinpath("__init__.py").write_text("raise ImportError('not this flysticky')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "cookiecutter", "--no-input", "-o"]

    run = subprocess.run(
        [*command, str(tmp_path / "out"), str(checkout / "template")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert files_of(tmp_path / "out" / "sticky_demo" / "vendor") == [
        "flysticky-9.9.9-py3-none-any.whl"
    ]

    alone = tmp_path / "alone"
    shutil.copytree(TEMPLATE, alone, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run(
        [*command, str(tmp_path / "out2"), str(alone)], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "cannot import flysticky" in run.stderr and "flysticky new" in run.stderr


def test_flysticky_new_uses_the_bundled_template(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert (
        flysticky_main(
            [
                "new",
                "--no-input",
                "--output-dir",
                str(tmp_path),
                "framework=quart",
                "project_name=Pip User",
            ]
        )
        == 0
    )
    assert (
        "from flysticky.quart import StickySessions"
        in (tmp_path / "pip_user" / "app.py").read_text()
    )
    assert (
        flysticky_main(
            ["new", "--no-input", "--output-dir", str(tmp_path / "bad"), "fly_app_name=NO"]
        )
        == 1
    )
    assert "fly_app_name='NO'" in capfd.readouterr().err
    # framework is a choice variable: refused before cookiecutter runs, as a usage error.
    assert (
        flysticky_main(
            ["new", "--no-input", "--output-dir", str(tmp_path / "bad"), "framework=django"]
        )
        == 2
    )
    assert "framework='django': one of sanic, quart, fastapi" in capfd.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


# --- The vendored wheel -------------------------------------------------------------------


def test_vendored_wheel_is_complete_and_holds_no_bytecode(tmp_path: Path) -> None:
    path = write_wheel(tmp_path)
    assert path.name == f"flysticky-{flysticky.__version__}-py3-none-any.whl"
    assert write_wheel(tmp_path / "again").read_bytes() == path.read_bytes()  # reproducible
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        dist_info = f"flysticky-{flysticky.__version__}.dist-info"
        record = wheel.read(f"{dist_info}/RECORD").decode().splitlines()
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if name.endswith("RECORD"):
                continue
            data = wheel.read(name)
            encoded = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={encoded.decode()}" and int(size) == len(data)
        assert len(record) == len(names)
        core = wheel.read(f"{dist_info}/METADATA").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) for n in names)
    assert {"flysticky/__init__.py", "flysticky/vendoring.py", "flysticky/py.typed"} <= set(names)
    assert "flysticky/template/cookiecutter.json" in names  # `flysticky new` works from it
    assert f"Version: {flysticky.__version__}\n" in core
    assert re.search(r'^Requires-Dist: sanic>=[\d.]+; extra == "sanic"$', core, re.M)
    assert "flysticky = flysticky.cli:main" in entry_points


# --- The package as released ----------------------------------------------------------------


def test_sdist_and_wheel_build_pass_twine_and_hold_no_bytecode(tmp_path: Path) -> None:
    """`python -m build` on a copy of the sources with bytecode planted where a developer's
    runs leave it (tests of generated projects, hooks, the package): none of it ships."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("flysticky", "template"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    slug = source / "template" / "{{cookiecutter.project_slug}}"
    for folder in (slug, slug / "tests", source / "template" / "hooks", source / "flysticky"):
        folder.joinpath("__pycache__").mkdir(exist_ok=True)
        folder.joinpath("__pycache__", "stale.cpython-311.pyc").write_bytes(b"\0")
        folder.joinpath("stale.pyc").write_bytes(b"\0")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    version = flysticky.__version__
    wheel, sdist = (
        dist / f"flysticky-{version}-py3-none-any.whl",
        dist / f"flysticky-{version}.tar.gz",
    )
    assert sorted(dist.iterdir()) == sorted([wheel, sdist])
    check = subprocess.run(
        [str(BIN / "twine"), "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    with zipfile.ZipFile(wheel) as archive:
        in_wheel = archive.namelist()
    with tarfile.open(sdist) as archive:
        in_sdist = archive.getnames()
    for names in (in_wheel, in_sdist):
        assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert "flysticky/template/{{cookiecutter.project_slug}}/.gitignore" in in_wheel
    # Every module ships: a subpackage missing from pyproject's packages would not.
    modules = {
        f"flysticky/{path.relative_to(ROOT / 'flysticky').as_posix()}"
        for path in (ROOT / "flysticky").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert modules <= set(in_wheel), sorted(modules - set(in_wheel))
    assert "flysticky/template/{{cookiecutter.project_slug}}/grafana/flysticky.json" in in_wheel
    assert "flysticky/template/{{cookiecutter.project_slug}}/tests/test_app.py" not in in_wheel
    assert f"flysticky-{version}/template/hooks/pre_gen_project.py" in in_sdist

    # Installed from that wheel (a pure wheel installs by unzipping), flysticky vendors
    # the same files, and its own dist-info's metadata.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    vendor = tmp_path / "vendor"
    script = (
        "import sys, pathlib, flysticky.vendoring as v; v.write_wheel(pathlib.Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    # Run from tmp_path: `python -c` puts the working directory (the checkout) first on sys.path.
    subprocess.run([sys.executable, "-c", script, str(vendor)], env=env, check=True, cwd=tmp_path)
    with zipfile.ZipFile(vendor / wheel.name) as archive:
        vendored = archive.namelist()
        core_metadata = archive.read(f"flysticky-{version}.dist-info/METADATA")
    assert sorted(vendored) == sorted(in_wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert core_metadata == archive.read(f"flysticky-{version}.dist-info/METADATA")
