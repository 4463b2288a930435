"""Keep only the chosen framework's files."""

from pathlib import Path

framework = {{ cookiecutter.framework | tojson }}
other = "quart" if framework == "sanic" else "sanic"

Path(f"{framework}_app.py").rename("app.py")
Path(f"{other}_app.py").unlink()
Path("tests", f"test_{framework}.py").rename(Path("tests", "test_app.py"))
Path("tests", f"test_{other}.py").unlink()
