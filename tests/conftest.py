from __future__ import annotations

from collections.abc import Callable

import pytest

from flysticky import StickyConfig

from .harness import HARNESSES, MACHINE, Harness

MakeHarness = Callable[..., Harness]


@pytest.fixture(params=sorted(HARNESSES))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def on_fly(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FLY_MACHINE_ID", MACHINE)
    monkeypatch.setenv("FLY_REGION", "iad")
    return MACHINE


@pytest.fixture
def make(framework: str, on_fly: str) -> MakeHarness:
    def build(config: StickyConfig | None = None) -> Harness:
        return HARNESSES[framework](config)  # type: ignore[no-any-return]

    return build
