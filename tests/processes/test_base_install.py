"""``pip install langchain-redis-bus`` (no extras) is enough for an app that publishes.

A bare venv gets only the base package, built from this checkout, with the
pinned versions of ``constraints.txt``. Dependencies come from a wheelhouse
kept across runs (in the user's cache directory, keyed by the pins), so only
the first run downloads; later runs install offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from bus import decode
from bus import events as ev
from bus.keys import ENTRY_FIELD, Keys
from bus.settings import Settings
from bus.tokens import verify_token
from tests.support.processes import ROOT

APP = ROOT / "tests" / "support" / "publish_only_app.py"
CONSTRAINTS = ROOT / "constraints.txt"
# What a checkout needs to build the package (as the Dockerfile copies it).
SOURCES = ("pyproject.toml", "README.md", "bus", "workers")


def _pip(*args: str | Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *map(str, args)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n{done.stderr}"


def _wheelhouse(source: Path) -> Path:
    """Wheels of the base install's dependencies and build tools, downloaded once per pin set."""
    pins = hashlib.sha256(CONSTRAINTS.read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lcbus-tests"
    house = cache / f"base-wheels-{pins.hexdigest()[:16]}"
    if house.is_dir():
        return house
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{house.name}.{uuid.uuid4().hex}"
    _pip("download", "-q", "-d", partial, "-c", CONSTRAINTS, source, "setuptools>=77", "wheel")
    try:
        partial.rename(house)  # atomic: a concurrent run may have won, which is as good
    except OSError:
        shutil.rmtree(partial)
    return house


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("base-install")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    house = _wheelhouse(source)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    _pip(
        "--python", python, "install", "-q", "--no-index", "--find-links", house,
        "-c", CONSTRAINTS, source,
    )  # fmt: skip
    return python


def test_base_install_publishes_a_chain_without_the_extras(
    bare_python: Path, settings: Settings, sync_redis: redis.Redis
) -> None:
    settings = settings.replace(partitions=1)
    root = str(uuid.uuid4())
    env = {"PATH": os.environ["PATH"], "HOME": str(Path.home()), **settings.to_env()}
    out = subprocess.run(
        [bare_python, "-I", APP, root], cwd=bare_python.parent, env=env,
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    report = json.loads(out.stdout)
    site = bare_python.parent.parent
    assert report["answer"] == "Hello from the bus" and report["flushed"] is True
    assert Path(report["bus_file"]).is_relative_to(site)
    assert report["installed"] == []

    entries = sync_redis.xrange(Keys(settings.prefix).events(0))
    events = [decode(fields[ENTRY_FIELD]) for _, fields in entries]
    # A run's name rides on its start and end; its token events do not repeat it.
    names = {e.run_id: e.name for e in events if e.name}
    assert all(e.name == "" for e in events if isinstance(e, ev.LLMNewToken))
    seen = [
        (e.seq, ev.event_type(e), names[e.run_id], names.get(e.parent_run_id or ""), _payload(e))
        for e in events
    ]
    chain, model, prompt = "RunnableSequence", "GenericFakeChatModel", "ChatPromptTemplate"
    parser, answer = "StrOutputParser", "Hello from the bus"
    prompt_value = {"messages": [_human("Say hello to Redis")]}
    assert seen == [
        (1, "on_chain_start", chain, None, {"input": ""}),
        (2, "on_chain_start", prompt, chain, {"who": "Redis"}),
        (3, "on_chain_end", prompt, chain, prompt_value),
        (4, "on_chat_model_start", model, chain, [[_human("Say hello to Redis")]]),
        (5, "on_llm_new_token", model, chain, "Hello"),
        (6, "on_chain_start", parser, chain, {"input": ""}),
        (7, "on_llm_new_token", model, chain, " "),
        (8, "on_llm_new_token", model, chain, "from"),
        (9, "on_llm_new_token", model, chain, " "),
        (10, "on_llm_new_token", model, chain, "the"),
        (11, "on_llm_new_token", model, chain, " "),
        (12, "on_llm_new_token", model, chain, "bus"),
        (13, "on_llm_end", model, chain, answer),
        (14, "on_chain_end", parser, chain, answer),
        (15, "on_chain_end", chain, None, answer),
    ]
    assert {e.trace_id for e in events} == {root} and events[0].run_id == root
    assert len({e.id for e in events}) == len(events)


def test_base_install_runs_the_cli(bare_python: Path) -> None:
    lcbus = bare_python.parent / "lcbus"
    env = {"PATH": os.environ["PATH"], "LCBUS_STREAM_SECRET": "base-secret"}
    out = subprocess.run(
        [lcbus, "token", "trace-1"], env=env, capture_output=True, text=True, check=True
    )
    assert verify_token(out.stdout.strip(), secret="base-secret") == "trace:trace-1"


def _human(text: str) -> dict[str, object]:
    return {
        "content": text,
        "additional_kwargs": {},
        "response_metadata": {},
        "type": "human",
        "name": None,
        "id": None,
    }


def _payload(event: ev.Event) -> object:
    """The one field of each event type that carries the run's data."""
    if isinstance(event, ev.ChainStart):
        return event.inputs
    if isinstance(event, ev.ChainEnd):
        return event.outputs
    if isinstance(event, ev.ChatModelStart):
        return event.messages
    if isinstance(event, ev.LLMNewToken):
        return event.token
    if isinstance(event, ev.LLMEnd):
        return event.text
    raise AssertionError(f"unexpected event {event!r}")
