"""Real arq worker processes against real Redis: crashes, shutdown, outages, dead letters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from bus.cli import main as lcbus
from bus.keys import Keys
from bus.settings import Settings
from tests.support.probe_worker import GROUP, failing_key, handled_key
from tests.support.processes import ROOT, start_worker, stop
from tests.support.publishing import make_event, publish, publish_raw, traces_events
from tests.support.redis_server import OwnedRedis
from tests.support.waiting import wait_until

Record = tuple[str, str, int, int]
"""(partition/entry id, trace id, seq, pid of the replica that handled it)"""


def records(client: redis.Redis, prefix: str) -> list[Record]:
    out = []
    for line in client.lrange(handled_key(prefix), 0, -1):
        entry_id, trace_id, seq, pid = line.decode().split()
        out.append((entry_id, trace_id, int(seq), int(pid)))
    return out


def unique_count(client: redis.Redis, prefix: str) -> int:
    return len({r[0] for r in records(client, prefix)})


def handled_all(client: redis.Redis, prefix: str, total: int) -> bool:
    # LLEN first: parsing every record on each poll would load the machine.
    return client.llen(handled_key(prefix)) >= total and unique_count(client, prefix) == total


def owner_pids(client: redis.Redis, settings: Settings) -> list[int | None]:
    keys = Keys(settings.prefix)
    values = [client.get(keys.lease(GROUP, p)) for p in range(settings.partitions)]
    # Replica ids are host:pid:nonce.
    return [None if v is None else int(v.decode().split(":")[-2]) for v in values]


def assert_first_handled_in_order(handled: list[Record]) -> None:
    first_seen: dict[str, list[int]] = {}
    seen: set[str] = set()
    for entry_id, trace_id, seq, _pid in handled:
        if entry_id not in seen:
            seen.add(entry_id)
            first_seen.setdefault(trace_id, []).append(seq)
    for trace_id, seqs in first_seen.items():
        assert seqs == sorted(seqs), f"trace {trace_id} first handled out of order"


def duplicates(handled: list[Record]) -> int:
    return sum(n - 1 for n in Counter(r[0] for r in handled).values())


def test_sigkill_one_replica_mid_stream_loses_nothing(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    settings = settings.replace(partitions=8, lease_ttl_ms=1500, read_count=20, read_block_ms=500)
    events = traces_events(50, 400)
    assert publish(sync_redis, settings, events) == 20_000
    a = start_worker(settings, tmp_path / "a.log", PROBE_DELAY_MS="40")
    b = start_worker(settings, tmp_path / "b.log", PROBE_DELAY_MS="40")
    try:
        wait_until(
            lambda: (
                {a.pid, b.pid} <= set(owner_pids(sync_redis, settings))
                and sync_redis.llen(handled_key(settings.prefix)) >= 3000
            ),
            what="both replicas owning partitions",
        )
        stop(a, signal.SIGKILL)
        killed_at = time.monotonic()
        handled_at_kill = unique_count(sync_redis, settings.prefix)
        wait_until(lambda: owner_pids(sync_redis, settings) == [b.pid] * 8, what="takeover")
        takeover_s = time.monotonic() - killed_at
        wait_until(lambda: handled_all(sync_redis, settings.prefix, 20_000), within=90)
    finally:
        stop(a)
        stop(b, signal.SIGTERM)
    handled = records(sync_redis, settings.prefix)
    print(
        f"\nSIGKILL at {handled_at_kill}/20000 handled; takeover after {takeover_s:.2f} s "
        f"(lease {settings.lease_ttl_ms} ms); {duplicates(handled)} duplicate deliveries"
    )
    assert handled_at_kill < 20_000
    assert {r[0] for r in handled} == set(_all_entry_ids(sync_redis, settings))
    assert_first_handled_in_order(handled)
    # Expiry of the dead replica's lease, then the survivor's next heartbeat.
    heartbeat_s = settings.heartbeat_interval_s
    assert takeover_s < settings.lease_ttl_ms / 1000 + 2 * heartbeat_s + 1.0


def _all_entry_ids(client: redis.Redis, settings: Settings) -> list[str]:
    keys = Keys(settings.prefix)
    ids = []
    for p in range(settings.partitions):
        ids += [f"{p}/{entry_id.decode()}" for entry_id, _ in client.xrange(keys.events(p))]
    return ids


def test_sigterm_acks_the_batch_in_hand_and_releases_leases_at_once(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    # A 30 s lease: a takeover within seconds can only come from the release.
    settings = settings.replace(partitions=4, lease_ttl_ms=30_000, read_count=10)
    publish(sync_redis, settings, traces_events(50, 40))
    a = start_worker(settings, tmp_path / "a.log", PROBE_DELAY_MS="100")
    b = start_worker(settings, tmp_path / "b.log", PROBE_DELAY_MS="100")
    try:
        wait_until(
            lambda: (
                {a.pid, b.pid} <= set(owner_pids(sync_redis, settings))
                and sync_redis.llen(handled_key(settings.prefix)) >= 200
            ),
            what="both replicas owning partitions",
        )
        stop(a, signal.SIGTERM)
        stopped_at = time.monotonic()
        assert a.returncode == 0
        assert a.pid not in owner_pids(sync_redis, settings)
        wait_until(lambda: owner_pids(sync_redis, settings) == [b.pid] * 4, what="takeover")
        takeover_s = time.monotonic() - stopped_at
        wait_until(lambda: handled_all(sync_redis, settings.prefix, 2000))
    finally:
        stop(a)
        stop(b, signal.SIGTERM)
    handled = records(sync_redis, settings.prefix)
    print(f"\nSIGTERM takeover after {takeover_s:.2f} s with a 30 s lease")
    assert takeover_s < 10
    # Whatever the stopped replica handled it also acked: nothing was re-handled.
    assert duplicates(handled) == 0
    assert_first_handled_in_order(handled)
    keys = Keys(settings.prefix)
    for p in range(settings.partitions):
        assert sync_redis.xpending(keys.events(p), GROUP)["pending"] == 0


def test_worker_rides_out_a_redis_restart(tmp_path: Path, prefix: str) -> None:
    server = OwnedRedis(aof=True)
    server.start()
    settings = Settings(
        redis_url=server.url,
        prefix=prefix,
        partitions=4,
        lease_ttl_ms=1500,
        read_count=20,
        read_block_ms=300,
    )
    client = server.client()
    worker = start_worker(settings, tmp_path / "w.log", PROBE_DELAY_MS="20")
    try:
        publish(client, settings, traces_events(30, 100, tag="before"))
        wait_until(lambda: client.llen(handled_key(prefix)) >= 500, what="first handled")
        # Down long enough for every loop of the worker to hit the outage.
        server.restart(down_s=2)
        wait_until(lambda: unique_count(client, prefix) == 3000, what="resume after restart")
        publish(client, settings, traces_events(10, 100, tag="after"))
        wait_until(lambda: unique_count(client, prefix) == 4000, what="new events after restart")
        assert worker.poll() is None
        assert_first_handled_in_order(records(client, prefix))
    finally:
        stop(worker, signal.SIGTERM)
        server.close()
        client.close()
    log = (tmp_path / "w.log").read_text()
    assert "Redis unavailable" in log


def test_dead_letters_from_a_worker_list_and_replay_through_the_cli(
    settings: Settings,
    sync_redis: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings.replace(partitions=2, max_attempts=2, retry_backoff_ms=5)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    sync_redis.set(failing_key(settings.prefix), 1)
    events = [make_event("tx", s, fail=s == 50) for s in range(100)]
    publish(sync_redis, settings, events[:60])
    publish_raw(sync_redis, settings, 0, b"\xc1\xc1")
    publish(sync_redis, settings, events[60:])
    worker = start_worker(settings, tmp_path / "w.log")
    try:
        wait_until(lambda: unique_count(sync_redis, settings.prefix) == 99, what="rest handled")
        wait_until(lambda: sync_redis.xlen(Keys(settings.prefix).dlq(GROUP)) == 2)
        capsys.readouterr()
        assert lcbus(["dlq", "list", GROUP, "--json"]) == 0
        letters = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sorted(letter["reason"] for letter in letters) == ["handler_failed", "undecodable"]
        failed = next(letter for letter in letters if letter["reason"] == "handler_failed")
        assert "RuntimeError: probe refuses tx-50" in failed["error"]

        sync_redis.delete(failing_key(settings.prefix))
        assert lcbus(["dlq", "replay", GROUP, failed["id"]]) == 0
        wait_until(lambda: unique_count(sync_redis, settings.prefix) == 100, what="replayed")
        capsys.readouterr()
        assert lcbus(["status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        (group,) = status["groups"]
        assert group["name"] == GROUP
        assert group["dead_letters"] == 1
        wait_until(lambda: _group_pending(sync_redis, settings) == 0)
    finally:
        stop(worker, signal.SIGTERM)
    seqs = [r[2] for r in records(sync_redis, settings.prefix)]
    assert seqs == [s for s in range(100) if s != 50] + [50]


def _group_pending(client: redis.Redis, settings: Settings) -> int:
    keys = Keys(settings.prefix)
    return sum(
        client.xpending(keys.events(p), GROUP)["pending"] for p in range(settings.partitions)
    )


def test_arq_check_reports_a_running_worker_healthy(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker(settings, tmp_path / "w.log")
    env_args = ["-m", "arq", "--check", "tests.support.probe_worker.WorkerSettings"]
    try:
        health_key = Keys(settings.prefix).arq_queue("probe") + ":health-check"
        wait_until(lambda: sync_redis.exists(health_key) == 1, what="health recorded")
        check = _run_check(settings, tmp_path, env_args)
        assert check.returncode == 0, check.stdout
    finally:
        stop(worker, signal.SIGTERM)
    assert _run_check(settings, tmp_path, env_args).returncode == 1


def _run_check(
    settings: Settings, tmp_path: Path, args: list[str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env()}
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
