"""The cookiecutter template: every variant generated, linted, tested and started."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.main import cookiecutter

from flysticky.cli import main as flysticky_main
from flysticky.proxy.cache import load_rules

from .fly_schema import problems

ROOT = Path(__file__).parent.parent
TEMPLATE = ROOT / "template"
BIN = Path(sys.executable).parent
CHECKOUT = f"flysticky @ {ROOT.as_uri()}"
VARIANTS = {
    "sanic-default": {"framework": "sanic"},
    "quart-default": {"framework": "quart"},
    "sanic-unusual": {
        "framework": "sanic",
        "project_name": "Ünïcode Démo 2",
        "project_slug": "unicode_demo_2",
        "fly_app_name": "x-1",
        "primary_region": "syd",
        "cookie_name": "sticky.pin",
        "python_version": "3.13",
    },
    "quart-unusual": {
        "framework": "quart",
        "project_name": "a",
        "fly_app_name": "a0",
        "primary_region": "gru",
        "cookie_name": "__pin",
        "python_version": "3.11",
    },
}


def generate(tmp_path: Path, answers: dict[str, str]) -> Path:
    context = {"flysticky_requirement": CHECKOUT, **answers}
    return Path(
        cookiecutter(str(TEMPLATE), no_input=True, extra_context=context, output_dir=str(tmp_path))
    )


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    answers = VARIANTS[request.param]
    path = generate(tmp_path_factory.mktemp(request.param), answers)
    path.joinpath(".variant.json").write_text(json.dumps(answers))
    return path


def answers_of(project: Path) -> dict[str, str]:
    return json.loads(project.joinpath(".variant.json").read_text())  # type: ignore[no-any-return]


def test_only_the_chosen_framework_and_nothing_unrendered(project: Path) -> None:
    framework = answers_of(project)["framework"]
    other = "quart" if framework == "sanic" else "sanic"
    names = sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file())
    assert "app.py" in names and "tests/test_app.py" in names
    assert not any(other in name for name in names)
    app = project.joinpath("app.py").read_text()
    assert f"from flysticky.{framework} import StickySessions" in app
    assert other not in app.lower()
    for path in project.rglob("*"):
        if path.is_file() and path.name != ".variant.json":
            text = path.read_text()
            assert "{{" not in text.replace("{{ ", "") or path.suffix == ".html"
            assert "cookiecutter" not in text, path
            assert "{%" not in text, path


def test_generated_tests_pass_with_flysticky_from_the_checkout(project: Path) -> None:
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
    requirements = project.joinpath("requirements.txt").read_text().splitlines()
    assert requirements[0] == CHECKOUT


def test_generated_code_is_ruff_clean(project: Path) -> None:
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "--no-cache", "--select", "E,F,W,I,B,UP", "."],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


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
    assert config["app"] == answers.get("fly_app_name", "sticky-demo")
    assert config["primary_region"] == answers.get("primary_region", "iad")
    service = config["http_service"]
    assert service["checks"][0]["path"] == "/health"
    (rule,) = service["http_options"]["replay_cache"]
    assert rule["name"] == answers.get("cookie_name", "fly-machine-id")
    assert rule["type"] == "cookie" and rule["path_prefix"] == "/"
    assert load_rules(project / "fly.toml")[0].name == rule["name"]  # the emulator reads it


def test_root_fly_toml_is_the_demo_template_rendered(tmp_path: Path) -> None:
    config = tomllib.loads(ROOT.joinpath("fly.toml").read_text())
    assert problems(config) == []
    demo = generate(
        tmp_path,
        {"project_name": "flysticky demo", "framework": "sanic", "fly_app_name": "flysticky-demo"},
    )
    assert config == tomllib.loads(demo.joinpath("fly.toml").read_text())


def test_schema_check_catches_what_flyctl_rejects() -> None:
    config = tomllib.loads(ROOT.joinpath("fly.toml").read_text())
    config["http_service"]["interal_port"] = 1
    config["http_service"]["http_options"]["replay_cache"][0]["ttl_seconds"] = 5
    config["app"] = "Bad_Name"
    found = " ".join(problems(config))
    assert "interal_port is not a key" in found
    assert "ttl_seconds: at least 10" in found
    assert "app='Bad_Name'" in found


def start_as_dockerfile_says(
    directory: Path, dockerfile: Path, port: int
) -> subprocess.Popen[bytes]:
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.M)
    assert cmd, "the Dockerfile needs an exec-form CMD"
    argv = json.loads(cmd.group(1))
    assert argv[0] == "python"
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "FLY_MACHINE_ID": "0123456789abcd"}
    return subprocess.Popen(
        [sys.executable, *argv[1:]],
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


def serve_and_check(directory: Path, dockerfile: Path) -> None:
    config = tomllib.loads(directory.joinpath("fly.toml").read_text())
    port = config["http_service"]["internal_port"]
    assert config["env"]["PORT"] == str(port)
    process = start_as_dockerfile_says(directory, dockerfile, port)
    try:
        deadline = time.monotonic() + 30
        status, body, headers = fetch(f"http://127.0.0.1:{port}/", deadline)
        assert status == 200
        assert "0123456789abcd" in body and "Visits this session" in body
        assert "fly-machine-id=0123456789abcd" in headers[
            "set-cookie"
        ] or "=0123456789abcd" in " ".join(headers.get_all("set-cookie"))
        assert fetch(f"http://127.0.0.1:{port}/health", deadline)[1] == "ok"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def test_dockerfile_start_command_serves_the_page_on_fly_toml_port(project: Path) -> None:
    serve_and_check(project, project / "Dockerfile")


def test_root_dockerfile_builds_and_serves_the_demo(tmp_path: Path) -> None:
    dockerfile = ROOT / "Dockerfile"
    run = re.search(r"&& (flysticky new .*?) \\$", dockerfile.read_text(), re.M)
    assert run
    argv = shlex.split(run.group(1))
    argv[argv.index("--output-dir") + 1] = str(tmp_path)
    assert flysticky_main(argv[1:]) == 0
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile.read_text(), re.M)[-1]
    demo = tmp_path / Path(workdir).name
    shutil.copy(ROOT / "fly.toml", demo / "fly.toml")
    serve_and_check(demo, dockerfile)


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"fly_app_name": "My_App"}, "fly_app_name='My_App': Fly app names are lowercase"),
        ({"fly_app_name": "-edge"}, "fly_app_name='-edge'"),
        ({"primary_region": "xyz"}, "primary_region='xyz': use a Fly region code such as iad"),
        ({"python_version": "2.7"}, "python_version='2.7': supported are 3.11, 3.12, 3.13"),
        ({"project_slug": "1abc"}, "project_slug='1abc': use a lowercase Python identifier"),
        ({"cookie_name": "a b"}, "cookie_name='a b': a cookie name"),
        ({"project_name": 'x"; import os; os._exit(0) #'}, "project_slug="),
    ],
)
def test_bad_variables_are_refused_and_nothing_is_written(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], answers: dict[str, str], message: str
) -> None:
    with pytest.raises(FailedHookException):
        generate(tmp_path, answers)
    assert message in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


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
    # framework is a choice variable: cookiecutter itself refuses other values.
    assert (
        flysticky_main(
            ["new", "--no-input", "--output-dir", str(tmp_path / "bad"), "framework=django"]
        )
        == 1
    )
    assert "choices are ['sanic', 'quart']" in capfd.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
