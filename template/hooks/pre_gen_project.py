"""Refuse bad answers before anything is written, saying what to type instead.

Regions and the cookie-name grammar are flysticky's own (flysticky.regions,
flysticky.config): the flysticky this template ships with is found first.
"""

import keyword
import re
import sys
from pathlib import Path

# This template's own flysticky: the installed package that holds it (flysticky/template)
# or the checkout that holds it (template/ beside flysticky/). post_gen_project.py does the same.
TEMPLATE = Path({{ cookiecutter._repo_dir | tojson }})
for root in (TEMPLATE.parent.parent, TEMPLATE.parent):
    if (root / "flysticky" / "__init__.py").is_file():
        sys.path.insert(0, str(root))
        break
try:
    from flysticky.config import is_cookie_name
    from flysticky.regions import region_problem
except (ImportError, SyntaxError):
    sys.exit(
        f"Cannot generate the project: {sys.executable} cannot import flysticky and {TEMPLATE} "
        "is not inside a flysticky checkout; run `pip install 'flysticky[template]'` (or "
        "`pip install -e '<checkout>[template]'`) and then `flysticky new`"
    )

REQUIREMENT = re.compile(
    r"flysticky(?:\s*@\s*\S+|\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[\w.*+!-]+"
    r"(?:\s*,\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[\w.*+!-]+)*)?"
)

answers = {
    "project_name": {{ cookiecutter.project_name | tojson }},
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "fly_app_name": {{ cookiecutter.fly_app_name | tojson }},
    "primary_region": {{ cookiecutter.primary_region | tojson }},
    "cookie_name": {{ cookiecutter.cookie_name | tojson }},
    "flysticky_requirement": {{ cookiecutter.flysticky_requirement | tojson }},
}
errors = []

name = answers["project_name"]
if not name.strip() or not name.isprintable():
    errors.append(f"project_name={name!r}: one line of printable text, such as Sticky Demo")
slug = answers["project_slug"]
if not slug.isidentifier() or not slug.isascii() or keyword.iskeyword(slug) or not slug.islower():
    errors.append(
        f"project_slug={slug!r}: use a lowercase ASCII Python identifier, such as sticky_demo"
    )
app = answers["fly_app_name"]
if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", app):
    errors.append(
        f"fly_app_name={app!r}: Fly app names are lowercase letters, digits and dashes "
        "(not at either end, at most 63), such as sticky-demo-x7k2pq"
    )
problem = region_problem(answers["primary_region"])
if problem is not None:
    errors.append(f"primary_region: {problem}")
if not is_cookie_name(answers["cookie_name"]):
    errors.append(
        f"cookie_name={answers['cookie_name']!r}: a cookie name of ASCII letters, digits and "
        "!#$%&'*+-.^_`|~, such as fly-machine-id"
    )
requirement = answers["flysticky_requirement"]
if requirement != "vendor" and not REQUIREMENT.fullmatch(requirement):
    errors.append(
        f"flysticky_requirement={requirement!r}: vendor (ship this flysticky in vendor/), or "
        "flysticky with a version, such as flysticky>=0.2 (the framework extra is added for you)"
    )

if errors:
    print("Cannot generate the project:", file=sys.stderr)
    for error in errors:
        print(f"  - {error}", file=sys.stderr)
    sys.exit(1)
