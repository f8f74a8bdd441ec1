"""The package's layers: nothing below imports from above it, and no module imports itself
back through others (issue 13: the worker split must be able to move a layer to another process
without dragging the one above with it).

Read from the source with ``ast``, imports inside functions and under ``TYPE_CHECKING`` included:
a type-only import from above is still a dependency on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "lbnode"

# The data plane and the configuration model: what a worker process runs. They never import the
# node's assembly (lbnode.node, cli, demos), the control API, the admin endpoint or the cluster
# agent (etcd, leases, VIPs), which stay in the supervising process.
BELOW = ("model", "runtime", "listen", "sockio", "limits", "affinity", "histogram", "logthrottle",
         "proxyproto", "proxyaccept", "accesslog", "stopsignals", "statedir", "reloadplan", "handover", "listeners", "routing", "balance", "health", "http", "http2", "tcp",
         "tls", "trioloop")
ABOVE = ("node", "cli", "demo", "demo_cluster", "demo_lan", "control", "admin", "cluster", "supervisor", "workers")

# A cycle inside one package between sibling modules, imported lazily: EtcdStore builds its
# EtcdCertificates and EtcdRoutes (which run on EtcdStore's connection) in its constructor.
ALLOWED_CYCLES = [{"lbnode.cluster.etcd", "lbnode.cluster.certstore", "lbnode.cluster.routestore"}]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if "api" in parts[:2]:
            continue  # generated gRPC stubs
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lbnode"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lbnode")}
    return {m for m in found if m in modules}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_nothing_below_imports_from_above() -> None:
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        if _top(name) in BELOW:
            wrong += [f"{name} imports {m}" for m in sorted(_imports(path, modules)) if _top(m) in ABOVE]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ with its own submodules, which import it back for its shared types
    # (lbnode.balance and its policies), is one unit: such a cycle stays inside the package.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    within_a_package = [c for c in cycles if len({".".join(m.split(".")[:2]) for m in c}) == 1
                        and any(m.count(".") == 1 for m in c)]  # the package's __init__ and its modules
    wrong = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES and c not in within_a_package]
    assert not wrong, wrong
