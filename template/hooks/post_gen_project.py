"""Keep only the chosen framework's files; vendor this flysticky's wheel if asked to."""

import sys
from pathlib import Path

# This template's own flysticky, found as pre_gen_project.py finds it (which checked it imports).
TEMPLATE = Path({{ cookiecutter._repo_dir | tojson }})
for root in (TEMPLATE.parent.parent, TEMPLATE.parent):
    if (root / "flysticky" / "__init__.py").is_file():
        sys.path.insert(0, str(root))
        break
from flysticky.vendoring import write_wheel  # noqa: E402

framework = {{ cookiecutter.framework | tojson }}

# Each framework offered has its <framework>_app.py and tests/test_<framework>.py.
for each in sorted(p.name.removesuffix("_app.py") for p in Path().glob("*_app.py")):
    if each == framework:
        Path(f"{each}_app.py").rename("app.py")
        Path("tests", f"test_{each}.py").rename(Path("tests", "test_app.py"))
    else:
        Path(f"{each}_app.py").unlink()
        Path("tests", f"test_{each}.py").unlink()

if {{ cookiecutter.flysticky_requirement | tojson }} == "vendor":
    # Docker's build context is the project: the wheel must be in it, and requirements.txt
    # names it relative to the project, where `pip install -r` and the Dockerfile run.
    wheel = write_wheel(Path("vendor"))
    with open("requirements.txt", "a") as requirements:
        requirements.write(f"./vendor/{wheel.name}[{framework},metrics]\n")
