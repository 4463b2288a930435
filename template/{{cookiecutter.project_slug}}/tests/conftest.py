import pytest

MACHINE = "90801679a10038"
OTHER = "148ed193b04d89"


@pytest.fixture(autouse=True)
def on_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", MACHINE)
    monkeypatch.setenv("FLY_REGION", {{ cookiecutter.primary_region | tojson }})
