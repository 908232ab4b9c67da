"""The folders are the data path: which package may import which.

A stage (producer, fanout, traces, webhooks, frontend) imports only the
shared top-level modules and ``bus.runtime``, never another stage; the
frontend alone mounts the trace and admin APIs. Shared modules import no
stage. Module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

BUS = Path(__file__).resolve().parents[2] / "bus"
STAGES = {"producer", "fanout", "traces", "webhooks", "frontend"}
MOUNTED = {"bus.traces.api", "bus.webhooks.admin"}


def module_name(path: Path) -> str:
    parts = path.relative_to(BUS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bus_imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bus" or node.module.startswith("bus."):
                if node.module != "bus":  # ``from bus import events`` is bus.events alone
                    found.add(node.module)
                # ``from bus.fanout import convert`` imports the module bus.fanout.convert.
                found.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if (BUS.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists()
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bus."))
    return found


def package_of(module: str) -> str:
    """The stage or folder a module belongs to; ``shared`` for top-level modules."""
    parts = module.split(".")
    return (
        parts[1] if len(parts) > 2 or (len(parts) == 2 and (BUS / parts[1]).is_dir()) else "shared"
    )


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(BUS.rglob("*.py"))}


def test_no_stage_imports_another_stage() -> None:
    offences = []
    for name, path in modules().items():
        own = package_of(name)
        for target in bus_imports(path, top_level_only=False):
            other = package_of(target)
            mounts = own == "frontend" and target in MOUNTED
            if own in STAGES and other in STAGES and other != own and not mounts:
                offences.append(f"{name} imports {target}")
    assert offences == []


def test_shared_modules_and_runtime_import_no_stage() -> None:
    offences = []
    for name, path in modules().items():
        if package_of(name) in {"shared", "runtime"} and name != "bus":  # bus re-exports
            for target in bus_imports(path, top_level_only=False):
                if package_of(target) in STAGES:
                    offences.append(f"{name} imports {target}")
    assert offences == []


def test_module_level_imports_have_no_cycle() -> None:
    graph = {
        name: {t for t in bus_imports(path, top_level_only=True) if t in modules()}
        for name, path in modules().items()
    }
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(node) :], node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*trail, node])
        done.add(node)

    for name in graph:
        visit(name, [])


def test_the_top_of_bus_stays_small() -> None:
    top = [p.name for p in BUS.glob("*.py")]
    assert len(top) <= 12, sorted(top)
