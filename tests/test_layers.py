"""kvrelay's layers are kept: a lower layer never loads a higher one, nothing imports a kvrelay module by a
string outside the CLI's dispatch, and no module imports itself back through others.

The layers, lowest first (DESIGN.md): base (`keys`, `params`, `versions`, `readyfile`, `serving`,
`tokenizer`, `proc`, the HTTP and Prometheus helpers, and every other top-level module not named below)
-> ``kernels`` -> ``transfer``, with ``security`` below it and ``events`` beside it -> ``store`` ->
``connector`` -> ``engines`` -> ``router`` (which speaks HTTP and KV events: it never loads the
kernels, the connector or an engine) -> the top: the launcher, the CLI, the diagnostics, ``bench``.

Four checks:
- dynamic: each layer's modules imported in one fresh interpreter per layer; after each import, no module
  of a layer it may not use is in ``sys.modules`` (so transitive imports count).  A module whose import
  needs an optional package that is absent here (vllm, dynamo, nixl, triton, mooncake) is skipped;
- static: every import statement under kvrelay/ (module level, in functions, under TYPE_CHECKING) names
  only layers its module may use (this also catches imports hidden inside functions);
- static: ``importlib.import_module`` / ``__import__`` / ``runpy.run_module`` with a kvrelay name, or with a
  name computed at run time, only in kvrelay/cli.py (the subcommand table);
- static: no import cycle between kvrelay modules (``from pkg import mod`` depends on ``pkg``'s
  ``__init__`` as well as on ``mod``; ``import pkg.mod`` and ``from pkg.mod import name`` on ``mod``).

This is the layer test of issue 21 (written here rather than import-linter, so that the transitive check
sees what really gets loaded).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kvrelay"

# top-level names (kvrelay.NAME) of the layers that are not base; anything else is base
LAYER_OF = {
    "kernels": "kernels", "security": "security", "transfer": "transfer", "events": "events", "store": "store",
    "connector": "connector", "engines": "engines", "router": "router",
    **{name: "top" for name in ("cli", "launcher", "demo", "supervisor", "status", "upstate", "cluster", "clusterplan",
                                "hostplan", "localplan", "diagnostics", "bench", "__main__")},
}
# the layers each layer may use (itself included)
ALLOWED = {
    "base": {"base"},
    "kernels": {"base", "kernels"},
    "security": {"base", "kernels", "security"},
    "transfer": {"base", "kernels", "security", "transfer"},
    "events": {"base", "kernels", "security", "events"},
    "store": {"base", "kernels", "security", "transfer", "events", "store"},
    "connector": {"base", "kernels", "security", "transfer", "events", "store", "connector"},
    "engines": {"base", "kernels", "security", "transfer", "events", "store", "connector", "engines"},
    "router": {"base", "security", "transfer", "events", "store", "router"},
}
OPTIONAL = {"vllm", "dynamo", "nixl", "nixl_cu12", "triton", "mooncake"}  # packages that may be absent
STRING_IMPORTS_ALLOWED = {"kvrelay.cli"}  # the subcommand table: `kvrelay NAME` imports NAME's module


def layer(module: str) -> str:
    parts = module.split(".")
    return LAYER_OF.get(parts[1], "base") if len(parts) > 1 else "base"


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(module: str, tree: ast.AST) -> list[tuple[str, int]]:
    """Every kvrelay module ``module`` imports (absolute names; ``from pkg import x`` gives ``pkg`` and
    ``pkg.x``), with its line."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return [(name, line) for name, line in out if name == "kvrelay" or name.startswith("kvrelay.")]


TREES = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


# ------------------------------------------------------------------------------------------------ static

def test_every_import_names_only_layers_below():
    breaks = []
    for module, tree in TREES.items():
        mine = layer(module)
        if mine == "top":
            continue
        for target, line in _imports(module, tree):
            if target != "kvrelay" and layer(target) not in ALLOWED[mine]:
                breaks.append(f"{_where(module, line)} ({mine}) imports {target} ({layer(target)})")
    assert not breaks, "imports against the layers:\n" + "\n".join(sorted(set(breaks)))


def _string_import(node: ast.Call) -> str | None:
    """Why ``node`` imports a module by a string that may name kvrelay (None if it does not)."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__", "run_module") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return f"{name}({arg.value!r})" if arg.value.startswith(("kvrelay", ".")) else None
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant) \
            and not str(arg.values[0].value).startswith("kvrelay"):
        return None  # an f-string that names another package
    return f"{name}({ast.unparse(arg)}): a name computed at run time"


def test_no_string_imports_outside_the_cli():
    found = []
    for module, tree in TREES.items():
        if module in STRING_IMPORTS_ALLOWED:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (why := _string_import(node)) is not None:
                found.append(f"{_where(module, node.lineno)}: {why}")
    assert not found, ("kvrelay modules imported by a string (use an import statement, in a function if it must "
                       "be lazy):\n" + "\n".join(found))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, tree in TREES.items():
        deps = set()
        for target, _ in _imports(module, tree):
            while target and target not in MODULES:  # a name imported from a module: that module
                target = target.rpartition(".")[0]
            deps.add(target)
        graph[module] = deps - {module, ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    """A negative control for the checks above: a graph with a cycle, and a layering break, are reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert layer("kvrelay.router.cacheview") == "router" and "engines" not in ALLOWED["router"]
    assert layer("kvrelay.tokenizer") == "base" and layer("kvrelay.bench.faults.cluster") == "top"
    call = ast.parse("importlib.import_module(f'kvrelay.bench.{name}')").body[0].value
    assert isinstance(call, ast.Call) and _string_import(call) is not None
    call = ast.parse("importlib.import_module('numpy')").body[0].value
    assert isinstance(call, ast.Call) and _string_import(call) is None


# ----------------------------------------------------------------------------------------------- dynamic

PROBE = r"""
import importlib, json, sys
optional = set(sys.argv[1].split(","))
out = {}
for module in sys.argv[2:]:
    before = set(sys.modules)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        out[module] = {"skipped": missing} if missing in optional else {"error": f"{type(exc).__name__}: {exc}"}
        continue
    except Exception as exc:
        out[module] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    out[module] = {"loaded": sorted(m for m in set(sys.modules) - before if m.startswith("kvrelay."))}
print(json.dumps(out))
"""


def _probe(mods: list[str]) -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-c", PROBE, ",".join(sorted(OPTIONAL)), *mods], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"importing {mods[0]}...: exit {r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_probe_sees_transitive_imports():
    """A negative control for the dynamic check: kvrelay.upstate (top) loads the store through its own
    imports, and the probe reports it, as it would for a base module doing the same."""
    loaded = _probe(["kvrelay.upstate"])["kvrelay.upstate"]["loaded"]
    assert any(layer(m) not in ALLOWED["base"] for m in loaded), loaded


@pytest.mark.timeout(900)
def test_no_layer_loads_a_layer_above_it():
    by_layer: dict[str, list[str]] = {}
    for module in MODULES:
        if layer(module) != "top" and not module.endswith("__main__"):
            by_layer.setdefault(layer(module), []).append(module)
    with ThreadPoolExecutor(max_workers=len(by_layer)) as pool:
        results = dict(zip(by_layer, pool.map(_probe, by_layer.values()), strict=True))
    breaks, errors, skipped = [], [], []
    for name, result in results.items():
        for module, got in result.items():
            if "error" in got:
                errors.append(f"{module}: {got['error']}")
            elif "skipped" in got:
                skipped.append(f"{module} ({got['skipped']} absent)")
            else:
                bad = sorted(m for m in got["loaded"] if layer(m) not in ALLOWED[name])
                if bad:
                    breaks.append(f"importing {module} ({name}) loads {', '.join(bad[:5])}"
                                  f"{' ...' if len(bad) > 5 else ''}")
    if skipped:
        print("skipped (optional package absent):", "; ".join(skipped))
    assert not errors, "modules that fail to import:\n" + "\n".join(errors)
    assert not breaks, "layers that load a layer above them:\n" + "\n".join(breaks)
