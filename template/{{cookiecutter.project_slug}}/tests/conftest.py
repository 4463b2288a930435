import pytest

MACHINE = "90801679a10038"
OTHER = "148ed193b04d89"
#: Room names the app refuses (each path segment as a browser would send it).
BAD_ROOMS = ["Lobby", "a" * 33, "a_b", "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", "caf%C3%A9"]


@pytest.fixture(autouse=True)
def on_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", MACHINE)
    monkeypatch.setenv("FLY_REGION", {{ cookiecutter.primary_region | tojson }})
