"""``bus.__all__`` stays honest: everything listed imports, every error is exported."""

from __future__ import annotations

import inspect
import subprocess
import sys

import bus
from bus import errors
from tests.support.processes import ROOT


def test_every_name_in_all_is_importable() -> None:
    for name in bus.__all__:
        assert getattr(bus, name) is not None, name
    assert bus.__all__ == sorted(bus.__all__)
    assert len(set(bus.__all__)) == len(bus.__all__)


def test_every_error_is_exported_and_drawn_in_the_tree() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)
    ]
    tree = errors.__doc__ or ""
    for cls in classes:
        assert issubclass(cls, errors.BusError)
        assert cls.__name__ in tree, f"{cls.__name__} missing from the tree in bus/errors.py"
        assert cls.__name__ in bus.__all__, f"{cls.__name__} is not exported from bus"


def test_importing_bus_does_not_load_the_web_stack() -> None:
    code = (
        "import sys, bus; print(any(m.startswith(('starlette', 'uvicorn')) for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
