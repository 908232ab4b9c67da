"""``bus.__all__`` stays honest: everything listed imports, every error is exported,
and ``import bus`` stays light."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import pytest

import bus
import bus.runtime
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


def _loaded_after(statement: str, packages: tuple[str, ...]) -> list[str]:
    """The top-level ``packages`` a fresh interpreter has loaded after ``statement``."""
    code = (
        f"import sys; {statement}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(packages)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded: list[str] = ast.literal_eval(out.stdout)
    return loaded


def test_importing_bus_does_not_load_the_web_stack() -> None:
    assert _loaded_after("import bus", ("starlette", "uvicorn", "sse_starlette")) == []


def test_importing_bus_does_not_load_the_worker_stack() -> None:
    packages = ("arq", "prometheus_client", "httpx", "standardwebhooks")
    assert _loaded_after("import bus", packages) == []
    # The worker factory is what loads arq (so the check above can fail).
    assert "arq" in _loaded_after("from bus.runtime import consumer_worker_settings", packages)


def test_all_serves_app_code_and_worker_names_come_from_the_runtime() -> None:
    worker_names = [
        "BatchHandler",
        "Delivery",
        "GroupConsumer",
        "WorkerContext",
        "consumer_worker_settings",
    ]
    assert bus.runtime.__all__ == worker_names
    for name in worker_names:
        assert name not in bus.__all__
        # Still importable from bus, as before, and the very same object.
        assert getattr(bus, name) is getattr(bus.runtime, name)
    for name in ("Keys", "partition_of", "Publisher", "PublisherStats"):
        assert name not in bus.__all__ and getattr(bus, name) is not None
    for name in ("BusCallbackHandler", "Settings", "stream_token", "list_traces", "TracePage"):
        assert name in bus.__all__
    assert bus.list_traces.__annotations__["return"] in ("TracePage", bus.TracePage)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = bus.Nope  # type: ignore[attr-defined]
