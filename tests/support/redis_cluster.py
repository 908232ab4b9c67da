"""A 3-master Redis Cluster of redis-server processes on free loopback ports.

One cluster serves a whole test session (every cluster test uses its own key
prefix). No replicas: a killed master is restarted from its AOF, which is
what the node-loss test exercises. ``appendfsync always`` so a SIGKILLed
master comes back with every write it acknowledged.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from bus.demo.ports import bindable
from tests.support.waiting import wait_until

MASTERS = 3


class OwnedCluster:
    """``start()``, ``kill(port)``, ``restart(port)``, ``reshard(...)``, ``stop()``."""

    def __init__(self, masters: int = MASTERS, *, durable: bool = True) -> None:
        self.durable = durable
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.skip("redis-server and redis-cli are needed for the cluster tests")
        self.ports = [_cluster_port() for _ in range(masters)]
        self.dir = Path(tempfile.mkdtemp(prefix="lcbus-cluster-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed node's URL (any node would do)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        try:
            self._create()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        for port in self.ports:
            self._spawn(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def _spawn(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                # Without replicas a dead master leaves its slots uncovered: the
                # others keep serving theirs instead of refusing everything.
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(node_dir),
                "--logfile",
                "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        try:
            wait_until(lambda: _pings(client), within=10, what=f"redis-server on {port}")
        finally:
            client.close()

    def wait_ok(self, within: float = 30.0) -> None:
        """Until every node reports the cluster ok, with all slots assigned."""

        def ok() -> bool:
            for port in self.ports:
                client = redis.Redis(port=port, decode_responses=True)
                try:
                    info = client.execute_command("CLUSTER INFO")
                except redis.RedisError:
                    return False
                finally:
                    client.close()
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                    return False
            return True

        wait_until(ok, within=within, what="cluster state ok")

    def owner_port(self, slot: int) -> int:
        """The port of the master that serves ``slot`` now."""
        for start, end, (_host, port, *_rest), *_ in redis.Redis(
            port=self.ports[0]
        ).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise LookupError(f"slot {slot} is not served")

    def node_id(self, port: int) -> str:
        client = redis.Redis(port=port, decode_responses=True)
        try:
            return str(client.execute_command("CLUSTER MYID"))
        finally:
            client.close()

    def reshard(self, *, source: int, target: int, slots: int) -> None:
        """Move ``slots`` slots from the master on ``source`` to the one on ``target``."""
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "reshard",
                f"127.0.0.1:{self.ports[0]}",
                "--cluster-from",
                self.node_id(source),
                "--cluster-to",
                self.node_id(target),
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
                "--cluster-pipeline",
                "100",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.wait_ok()

    def move_slot(
        self, slot: int, to_port: int, *, while_migrating: Callable[[], None] | None = None
    ) -> None:
        """Move one slot by hand, as ``redis-cli --cluster reshard`` does for each slot:
        mark it importing/migrating, MIGRATE its keys, then hand it over.
        ``while_migrating`` runs after the keys moved and before the hand-over
        (the source then answers ASK for them)."""
        from_port = self.owner_port(slot)
        source, target = redis.Redis(port=from_port), redis.Redis(port=to_port)
        try:
            target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", self.node_id(from_port))
            source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", self.node_id(to_port))
            while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            if while_migrating is not None:
                while_migrating()
            # Target first, then source: in the other order the source already
            # redirects to a target that does not own the slot yet (MOVED ping-pong).
            others = [p for p in self.ports if p not in (to_port, from_port)]
            for port in [to_port, from_port, *others]:
                node = redis.Redis(port=port)
                try:
                    node.execute_command("CLUSTER SETSLOT", slot, "NODE", self.node_id(to_port))
                finally:
                    node.close()
        finally:
            source.close()
            target.close()

    def unassign(self, slot: int) -> int:
        """Leave ``slot`` served by no master (``CLUSTER DELSLOTS`` on each, its owner
        first); returns the port of the master that served it."""
        owner = self.owner_port(slot)
        for port in [owner, *(p for p in self.ports if p != owner)]:
            node = redis.Redis(port=port)
            try:
                node.execute_command("CLUSTER DELSLOTS", slot)
            except redis.ResponseError:
                pass  # this node had already dropped it
            finally:
                node.close()
        return owner

    def assign(self, slot: int, port: int) -> None:
        """Give an unassigned ``slot`` to the master on ``port``; wait until all agree."""
        node = redis.Redis(port=port)
        try:
            node.execute_command("CLUSTER ADDSLOTS", slot)
        finally:
            node.close()

        def agreed() -> bool:
            return all(_served_by(p, slot) == port for p in self.ports)

        wait_until(agreed, within=30, what=f"slot {slot} served by {port} on every node")

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.kill()
        process.wait(timeout=10)

    def restart(self, port: int) -> None:
        self._spawn(port)
        self.wait_ok()

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port p with p + 10000 free too (the node's cluster bus), at most 55535."""
    for _ in range(100):
        port = random.randint(20_000, 55_000)
        if all(bindable(p) for p in (port, port + 10_000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _served_by(node_port: int, slot: int) -> int | None:
    """The port ``node_port``'s CLUSTER SLOTS names for ``slot`` (None: unassigned)."""
    client = redis.Redis(port=node_port)
    try:
        for start, end, (_host, port, *_rest), *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        return None
    finally:
        client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
