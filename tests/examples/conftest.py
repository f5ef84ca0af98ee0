"""Load the scripts under ``examples/`` as modules, so tests call their ``main(argv)`` in-process."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.conftest import REPO, load_script


def load_example(name: str) -> ModuleType:
    return load_script(REPO / "examples" / f"{name}.py")


@pytest.fixture
def example():
    return load_example
