"""Prometheus text exposition, read: parse a /metrics page into flat samples and sum them by labels.

Owns: `parse_metrics`, `sample_key`, `sum_samples` and `scrape` (GET a /metrics URL, parsed), used by the
launcher's demo, the benches and the tests on kvrelay's and vLLM's /metrics.  Must not touch: metric
export (each server owns its own).  Base layer: the standard library and prometheus_client's parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvrelay.httpjson import get_text


def sample_key(name: str, labels: dict[str, str]) -> str:
    """``name{a="x",b="y"}`` with the labels sorted; just ``name`` without labels."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample_key(name, labels): value} for every sample."""
    return {sample_key(s.name, s.labels): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def sum_samples(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (other labels summed over)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in want):
            total += value
    return total


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """GET ``url`` (a /metrics page), parsed by `parse_metrics`."""
    return parse_metrics(get_text(url, timeout))
