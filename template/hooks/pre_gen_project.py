"""Refuse bad answers before anything is written, saying what to type instead."""

import keyword
import re
import sys

# Fly.io regions (fly platform regions), plus nothing else: a typo here would
# only surface at `fly launch`.
REGIONS = {
    "ams", "arn", "atl", "bog", "bom", "bos", "cdg", "den", "dfw", "ewr", "eze", "fra",
    "gdl", "gig", "gru", "hkg", "iad", "jnb", "lax", "lhr", "mad", "mia", "nrt", "ord",
    "otp", "phx", "qro", "scl", "sea", "sin", "sjc", "syd", "waw", "yul", "yyz",
}
PYTHON_VERSIONS = ("3.11", "3.12", "3.13")
FRAMEWORKS = ("sanic", "quart")

answers = {
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "fly_app_name": {{ cookiecutter.fly_app_name | tojson }},
    "framework": {{ cookiecutter.framework | tojson }},
    "primary_region": {{ cookiecutter.primary_region | tojson }},
    "cookie_name": {{ cookiecutter.cookie_name | tojson }},
    "python_version": {{ cookiecutter.python_version | tojson }},
    "flysticky_requirement": {{ cookiecutter.flysticky_requirement | tojson }},
}
errors = []

slug = answers["project_slug"]
if not slug.isidentifier() or keyword.iskeyword(slug) or not slug.islower():
    errors.append(
        f"project_slug={slug!r}: use a lowercase Python identifier, such as sticky_demo"
    )
app = answers["fly_app_name"]
if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", app):
    errors.append(
        f"fly_app_name={app!r}: Fly app names are lowercase letters, digits and dashes "
        "(not at either end, at most 63), such as sticky-demo"
    )
if answers["framework"] not in FRAMEWORKS:
    errors.append(f"framework={answers['framework']!r}: choose sanic or quart")
region = answers["primary_region"]
if region not in REGIONS:
    errors.append(
        f"primary_region={region!r}: use a Fly region code such as iad, ams, sjc "
        f"(known: {', '.join(sorted(REGIONS))})"
    )
if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", answers["cookie_name"]):
    errors.append(
        f"cookie_name={answers['cookie_name']!r}: a cookie name of letters, digits and "
        "!#$%&'*+-.^_`|~, such as fly-machine-id"
    )
if answers["python_version"] not in PYTHON_VERSIONS:
    errors.append(
        f"python_version={answers['python_version']!r}: supported are "
        + ", ".join(PYTHON_VERSIONS)
    )
if not answers["flysticky_requirement"].strip() or "\n" in answers["flysticky_requirement"]:
    errors.append("flysticky_requirement: one requirement line, such as flysticky>=0.1")

if errors:
    print("Cannot generate the project:", file=sys.stderr)
    for error in errors:
        print(f"  - {error}", file=sys.stderr)
    sys.exit(1)
