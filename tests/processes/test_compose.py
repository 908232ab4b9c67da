"""compose.yaml cannot rot: every service's command starts here and becomes healthy.

Docker is not available on this machine, so each service of ``compose.yaml``
(except Redis, which the test run already has) is started as a local process
with that service's command and environment, pointed at the test's Redis and
key prefix, and the service's own health check command is run until it passes.
Workers run as two replicas each, as ``--scale`` would. SIGTERM then stops
every process cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus.demo.ports import free_port
from bus.settings import Settings
from tests.support.processes import ROOT
from tests.support.waiting import wait_until

COMPOSE = ROOT / "compose.yaml"
REPLICAS = {"fanout": 2, "traces": 2, "webhooks": 2}


def load_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


class LocalCompose:
    """Maps container ports and service hosts to loopback, commands to this venv."""

    def __init__(self, services: dict[str, Any], settings: Settings, log_dir: Path) -> None:
        self.services = services
        self.settings = settings
        self.log_dir = log_dir
        self.ports: dict[str, int] = {}
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: dict[int, Path] = {}
        for service in services.values():
            for arg in service.get("command", []):
                if re.fullmatch(r"\d{4,5}", str(arg)):
                    self.ports.setdefault(str(arg), free_port())

    def localize(self, text: str) -> str:
        text = text.replace("0.0.0.0", "127.0.0.1")
        for name in self.services:
            text = re.sub(rf"//{name}:(\d+)", lambda m: f"//127.0.0.1:{m.group(1)}", text)
        for port, local in self.ports.items():
            text = re.sub(rf"(?<=[:/ ]){port}\b|^{port}$", str(local), text)
        return text

    def argv(self, command: list[str]) -> list[str]:
        program, *rest = (self.localize(str(arg)) for arg in command)
        prefix = {
            "arq": [sys.executable, "-m", "arq"],
            "lcbus": [sys.executable, "-m", "bus.cli"],
            "python": [sys.executable],
        }.get(program)
        assert prefix is not None, f"compose.yaml runs {program!r}, which this test cannot map"
        return [*prefix, *rest]

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("LCBUS_") and k != "REDIS_URL"
        }
        env.update(
            {k: self.localize(str(v)) for k, v in (service.get("environment") or {}).items()}
        )
        env["LCBUS_REDIS_URL"] = self.settings.redis_url
        env["LCBUS_PREFIX"] = self.settings.prefix
        env["PYTHONPATH"] = str(ROOT)
        return env

    def start(self, name: str) -> None:
        service = self.services[name]
        for replica in range(REPLICAS.get(name, 1)):
            path = self.log_dir / f"{name}-{replica}.log"
            with path.open("ab") as log:
                process = subprocess.Popen(
                    self.argv(service["command"]),
                    cwd=ROOT,
                    env=self.env(service),
                    stdout=log,
                    stderr=log,
                )
            self.processes.append((name, process))
            self.logs[process.pid] = path

    def wait_healthy(self, name: str, within: float = 60.0) -> None:
        check = self.services[name]["healthcheck"]["test"]
        assert check[0] == "CMD", f"{name}: health checks must use the CMD form"
        argv = self.argv(check[1:])
        env = self.env(self.services[name])
        stderr = [b""]

        def healthy() -> bool:
            done = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, timeout=30, check=False
            )
            dead = [n for n, p in self.processes if n == name and p.poll() is not None]
            assert not dead, f"{name} exited: see {self.log_dir}"
            stderr[0] = done.stderr
            return done.returncode == 0

        try:
            wait_until(healthy, within=within, what=f"{name} healthy", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {stderr[0][-500:]!r}") from None

    def stop_all(self) -> list[str]:
        """SIGTERM everything; the services that did not shut down gracefully."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        unclean = []
        for name, process in self.processes:
            try:
                code = process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                unclean.append(f"{name}: still running 20 s after SIGTERM")
                continue
            # uvicorn finishes its shutdown, then re-raises the signal it caught.
            log = self.logs[process.pid].read_text(errors="replace")
            graceful = code == 0 or (
                code == -signal.SIGTERM and "Application shutdown complete" in log
            )
            if not graceful:
                unclean.append(f"{name}: exit {code}")
        return unclean


@pytest.fixture
def compose(settings: Settings, tmp_path: Path) -> Iterator[LocalCompose]:
    local = LocalCompose(load_services(), settings, tmp_path)
    yield local
    local.stop_all()


def test_compose_file_shape() -> None:
    services = load_services()
    assert {"redis", "fanout", "traces", "webhooks", "frontend", "model", "demo"} <= set(services)
    for worker in ("fanout", "traces", "webhooks"):
        service = services[worker]
        assert service["command"] == ["arq", f"workers.{worker}.WorkerSettings"]
        assert service["healthcheck"]["test"][1:3] == ["arq", "--check"]
        assert "container_name" not in service and "ports" not in service  # scalable
    assert (ROOT / "Dockerfile").exists()


def test_every_service_starts_and_becomes_healthy(compose: LocalCompose) -> None:
    order = ["fanout", "traces", "webhooks", "frontend", "model", "demo"]
    for name in order:
        compose.start(name)
    for name in order:
        compose.wait_healthy(name)
    assert compose.stop_all() == []


def test_cluster_compose_file_runs_the_same_commands_on_a_cluster() -> None:
    cluster: dict[str, Any] = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())[
        "services"
    ]
    plain = load_services()
    masters = [cluster[f"redis-{i}"]["command"] for i in (1, 2, 3)]
    assert all(command[command.index("--cluster-enabled") + 1] == "yes" for command in masters)
    assert "--cluster-enabled" not in cluster["queue"]["command"]
    for name in ("fanout", "traces", "webhooks", "frontend"):
        service = cluster[name]
        assert service["command"] == plain[name]["command"]
        assert service["healthcheck"]["test"] == plain[name]["healthcheck"]["test"]
        env = service["environment"]
        assert (env["LCBUS_REDIS_CLUSTER"], env["LCBUS_QUEUE_REDIS_URL"]) == (
            "true",
            "redis://queue:6379/0",
        )
        assert env["LCBUS_REDIS_URL"].startswith("redis://redis-1:")
