"""The packages import only downward, and no module takes part in an import cycle.

Read from the source with ``ast`` (nothing is imported), counting every import: at module level, inside functions
(a lazy import is still a dependency) and under ``TYPE_CHECKING``.  The allowed layering, bottom to top:

    helios_proto, helios_data     wire stubs; datasets and the held-out split (neutral: server and client read them)
    core                          helios_ray's leaf modules: errors, dtypes, paths, memory, console
    models                        architecture, loading, exit heads, quantization, prompts, the registry, ModelSpec
    engine    | control           the batching engine (on models) | the pure policy (plain Python, on core only)
    tuning                        exit training, evaluation, profiling (runs models through the engine)
    serve                         Ray Serve glue, ServeConfig, the HTTP/gRPC API
    cli                           the helios-ray command
    loadgen                       the load generator: a client that knows nothing of the server's code
    helios_bench                  benchmarks: drive the server with the load generator (may import anything)
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("helios_proto", "helios_data", "helios_ray", "loadgen", "helios_bench")
CORE = {"helios_ray", "helios_ray.errors", "helios_ray.dtypes", "helios_ray.paths", "helios_ray.memory",
        "helios_ray.console"}

#: layer -> the layers it may import (besides its own).
ALLOWED: dict[str, set[str]] = {
    "proto": set(),
    "data": set(),
    "core": set(),
    "models": {"core", "data"},
    "engine": {"core", "models"},
    "control": {"core"},
    "tuning": {"core", "data", "models", "engine", "control"},
    "serve": {"core", "data", "models", "engine", "control", "tuning", "proto"},
    "cli": {"core", "data", "models", "engine", "control", "tuning", "serve"},
    "loadgen": {"proto", "data"},
    "bench": {"proto", "data", "core", "models", "engine", "control", "tuning", "serve", "cli", "loadgen"},
}
#: Third-party packages a layer must never import (control is plain Python: simulation-testable, no torch/Ray).
FORBIDDEN_EXTERNAL = {"control": {"torch", "ray", "transformers"}, "data": {"torch", "ray", "transformers"},
                      "loadgen": {"torch", "ray"}, "models": {"ray"}, "engine": {"ray"}, "tuning": {"ray"}}


def layer_of(module: str) -> str:
    if module in CORE:
        return "core"
    top, _, rest = module.partition(".")
    if top == "helios_ray":
        sub = rest.split(".")[0]
        return sub if sub in {"models", "engine", "control", "tuning", "serve", "cli"} else f"unplaced:{module}"
    return {"helios_proto": "proto", "helios_data": "data", "loadgen": "loadgen", "helios_bench": "bench"}[top]


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party names) that ``module`` imports anywhere in its file."""
    internal: set[str] = set()
    external: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                while name and name not in known:  # ``from pkg import func`` -> pkg
                    name = name.rpartition(".")[0]
                if name and name != module:
                    internal.add(name)
            elif name:
                external.add(name.split(".")[0])
    return internal, external


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    edges, externals = {}, {}
    for m, p in mods.items():
        edges[m], externals[m] = imports_of(m, p, set(mods))
    return edges, externals


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        ls = layer_of(src)
        if ls.startswith("unplaced"):
            bad.append(f"{src} belongs to no layer: place it in ALLOWED")
            continue
        for dst in sorted(targets):
            ld = layer_of(dst)
            if ld != ls and ld not in ALLOWED[ls]:
                bad.append(f"{src} ({ls}) imports {dst} ({ld})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph one level up: one node per subpackage of helios_ray (models, engine, ...) or module directly
    in it (errors, cli, ...), and per other top-level package; a package importing its own ``__init__`` is no
    cycle."""
    def pkg(m: str) -> str:
        parts = m.split(".")
        if parts[0] == "helios_ray" and len(parts) > 1:
            return f"helios_ray.{parts[1]}"  # a subpackage, or a top-level module (core, cli) on its own
        return parts[0]

    out: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        for dst in targets:
            if pkg(src) != pkg(dst):
                out[pkg(src)].add(pkg(dst))
    return out


def test_every_import_goes_downward():
    edges, _ = graph()
    assert len(edges) > 100, "the walk found too few modules"
    assert layer_violations(edges) == []


def test_no_import_cycles_between_files_or_packages():
    edges, _ = graph()
    assert cycles(edges) == []
    assert cycles(package_edges(edges)) == []


def test_layers_keep_their_third_party_limits():
    _, externals = graph()
    bad = [f"{m} imports {x}" for m, names in sorted(externals.items())
           for x in sorted(names & FORBIDDEN_EXTERNAL.get(layer_of(m), set()))]
    assert bad == []


def test_the_server_never_imports_the_load_generator_or_the_benchmarks():
    edges, _ = graph()
    bad = [f"{m} -> {d}" for m, ds in edges.items() if m.startswith("helios_ray")
           for d in ds if d.split(".")[0] in ("loadgen", "helios_bench")]
    assert bad == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The walk sees lazy imports, relative imports and ``from pkg import name``; the checks report them."""
    edges, _ = graph()
    upward = {**edges, "helios_ray.models.loading": edges["helios_ray.models.loading"] | {"helios_ray.serve.app"}}
    assert any("helios_ray.models.loading (models) imports helios_ray.serve.app" in v
               for v in layer_violations(upward))
    looped = {**edges, "helios_ray.memory": edges["helios_ray.memory"] | {"helios_ray.models.spec"},
              "helios_ray.models.spec": {"helios_ray.memory"}}
    assert ["helios_ray.memory", "helios_ray.models.spec"] in cycles(looped)

    src = tmp_path / "m.py"
    src.write_text("def f():\n    from helios_ray.serve import app\n    from ..engine import engine\n")
    known = set(modules())
    internal, _ = imports_of("helios_ray.models.x", src, known)
    assert {"helios_ray.serve.app", "helios_ray.engine.engine"} <= internal
