"""``flysticky check [PATH]``: a Fly project read against the rules flysticky relies on.

It reads ``fly.toml``, the Dockerfile (``[build] dockerfile``, else ``Dockerfile``) and a
``Procfile`` if there is one, and the app's ``StickyConfig``. The config is found by
importing the app's module in a subprocess (``FLY_MACHINE_ID`` unset, the project first on
``sys.path``, a timeout), never by running the app's server: a module that calls something
like ``app.run(...)`` outside ``if __name__ == "__main__"`` is not imported at all. The
config's skipper and key function are asked about fly.toml's health-check paths and
replay-cache prefixes with the framework's own request object for a GET of that path.

Each finding has a stable kebab-case ``id``, a ``severity`` (``"error"`` or ``"warning"``),
where it is (``file`` and ``line``, when known), ``what``, ``why`` (the Fly rule) and
``fix``. ``--json`` prints ``{"path": ..., "findings": [...], "errors": n, "warnings": n}``,
each finding as ``{"id", "severity", "file", "line", "what", "why", "fix"}``.

Exit status: 0 without errors (warnings allowed), 1 with an error, or with a warning under
``--strict``; 2 when PATH cannot be checked (no fly.toml there, a fly.toml that is not TOML).

A warning is accepted on purpose with a comment anywhere in fly.toml:
``# flysticky: accept <id>`` (``# flysticky: accept autostop-loses-sessions``). Errors
cannot be accepted: each one is a setup that Fly or flysticky cannot work with.

Where each part lives:

- ``facts.py``: the ``Project``, plain facts only; what the rules read.
- ``project.py``: ``read_project()``, fly.toml with its line numbers; ``commands.py``, the
  Dockerfile, Procfile and ``[processes]``, and what each command starts (server, module,
  addresses, workers); ``source.py``, the app's module read as a syntax tree.
- ``probe.py``: the app's StickyConfig, read by importing its module in a subprocess, and the
  answers of its skipper and key function.
- ``rules.py``: the findings: why the config was not read, then the nine checks.
- here: ``check()`` (read, probe, rules), the ``Report`` and ``run()``, the command.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import rules
from .probe import read_config
from .project import UsageError, read_project
from .rules import Finding

__all__ = ["DEFAULT_TIMEOUT", "Finding", "Report", "UsageError", "check", "run"]

#: Seconds the app's module may take to import: one that serves at import never finishes.
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Report:
    path: Path
    findings: list[Finding]
    #: Warnings that fly.toml accepts (``# flysticky: accept <id>``).
    accepted: list[Finding]
    #: Where the StickyConfig was read from, for people: None when it was not.
    config_source: str | None

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == "warning" for f in self.findings)

    def as_json(self) -> str:
        return json.dumps(
            {
                "path": str(self.path),
                "findings": [asdict(f) for f in self.findings],
                "errors": self.errors,
                "warnings": self.warnings,
            },
            indent=2,
        )

    def as_text(self) -> str:
        blocks = [
            f"flysticky check {self.path}\n"
            + (
                f"  StickyConfig: {self.config_source}"
                if self.config_source
                else "  StickyConfig: not read (flysticky's defaults)"
            )
        ]
        for finding in self.findings:
            where = finding.file or "(project)"
            if finding.line:
                where += f":{finding.line}"
            if "\n" in finding.fix:  # a snippet keeps its lines
                fix = "  fix: " + textwrap.indent(finding.fix, "       ").lstrip()
            else:
                fix = textwrap.fill(
                    finding.fix,
                    100,
                    initial_indent="  fix: ",
                    subsequent_indent="       ",
                    break_long_words=False,  # code: `# flysticky: accept <id>` stays whole
                    break_on_hyphens=False,
                )
            blocks.append(
                f"{where}: {finding.severity} [{finding.id}]\n"
                + textwrap.fill(finding.what, 100, initial_indent="  ", subsequent_indent="  ")
                + "\n"
                + textwrap.fill(
                    finding.why, 100, initial_indent="  why: ", subsequent_indent="       "
                )
                + f"\n{fix}"
            )
        summary = f"{_count(self.errors, 'error')}, {_count(self.warnings, 'warning')}"
        if self.accepted:
            summary += f" ({_count(len(self.accepted), 'warning')} accepted in fly.toml)"
        blocks.append(summary)
        return "\n\n".join(blocks)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check(path: Path, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Check the project at ``path``; UsageError when it is not a Fly project."""
    try:
        root = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before 3.13)
        raise UsageError(f"{path}: cannot be resolved: {error}") from None
    project = read_project(root)
    if project.app is not None:
        probe = read_config(project.app, root, project.questions, timeout)
        project = replace(project, probe=probe)
    found = rules.findings(project)
    accepted = [f for f in found if f.severity == "warning" and f.id in project.accepted]
    reported = [f for f in found if f not in accepted]
    reported.sort(key=lambda f: f.severity != "error")  # errors first, each in check order
    source = None
    read = project.config_read
    if read is not None and project.app is not None:
        what = (
            "a StickyConfig" if read.kind == "config" else f"flysticky.{read.kind}.StickySessions"
        )
        source = f"{project.app.file}, `{read.name}` ({what})"
    return Report(root, reported, accepted, source)


def run(
    path: Path, *, as_json: bool = False, strict: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """``flysticky check``: print the report; the exit status (see the module's doc)."""
    try:
        report = check(path, timeout)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = report.as_json() if as_json else report.as_text()
    # fly.toml's paths and names may be anything: where stdout cannot encode them
    # (PYTHONIOENCODING=ascii), escaped as stderr does, not a UnicodeEncodeError.
    encoding = sys.stdout.encoding or "utf-8"
    text = text.encode(encoding, "backslashreplace").decode(encoding)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`flysticky check | head`): the status still says it all,
        # and stdout goes nowhere so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if report.errors or (strict and report.warnings) else 0
