"""The worker processes run on uvloop: arq's Worker takes the loop the worker module set."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What arq's command line does: import the settings, build the Worker (no Redis needed yet).
PROBE = """
import importlib, sys
from arq.worker import create_worker
module = importlib.import_module(sys.argv[1])
worker = create_worker(module.WorkerSettings)
print(type(worker.loop).__module__)
worker.loop.close()
"""


@pytest.mark.parametrize("module", ["workers.fanout", "workers.traces", "workers.webhooks"])
def test_arq_builds_the_worker_on_uvloop(module: str) -> None:
    pytest.importorskip("uvloop")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip().startswith("uvloop"), probe.stdout + probe.stderr


def test_without_uvloop_the_current_loop_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    from bus.runtime.eventloop import use_uvloop

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        assert use_uvloop() is False
        assert asyncio.get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()
