"""The daemon's Prometheus metrics and health endpoints (/metrics, /healthz, /readyz on 127.0.0.1).

Owns: the metric names and the small HTTP server thread.  Must not touch: store state (it only reads
`StoreCore.stats()` at scrape time and records pull latencies handed to it).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvrelay.security.metrics import register as register_auth_metrics

_COUNTERS = {
    "evictions_memory": ("kvrelay_store_evictions_total", "chunks evicted", {"tier": "memory"}),
    "evictions_ssd": ("kvrelay_store_evictions_total", "chunks evicted", {"tier": "ssd"}),
    "evictions_dropped": ("kvrelay_store_dropped_total", "chunks evicted from memory with no SSD copy", {}),
    "admission_refusals": ("kvrelay_store_admission_refusals_total", "reservations refused (pool full)", {}),
    "lease_expiries": ("kvrelay_store_lease_expiries_total", "leases that expired", {}),
    "reservation_expiries": ("kvrelay_store_reservation_expiries_total", "reservations never committed", {}),
    "ttl_expiries": ("kvrelay_store_ttl_expiries_total", "chunks dropped by chunk_ttl", {}),
    "checksum_failures": ("kvrelay_store_checksum_failures_total", "chunks refused or dropped on checksum", {}),
    "spill_errors": ("kvrelay_store_spill_errors_total", "failed SSD writes (e.g. disk full)", {}),
    "commits": ("kvrelay_store_commits_total", "chunks committed", {}),
    "pulls": ("kvrelay_store_pulls_total", "chunks handed to pullers", {}),
    "lookups": ("kvrelay_store_lookup_requests_total", "lookup requests", {}),
    "lookup_hits": ("kvrelay_store_lookup_request_hits_total", "lookup requests with a prefix hit", {}),
    "lookup_chunks": ("kvrelay_store_lookup_chunks_total", "chunks asked for by lookups", {}),
    "lookup_chunks_hit": ("kvrelay_store_lookup_chunks_hit_total", "chunks found by lookups (token-level)", {}),
    "bad_requests": ("kvrelay_store_error_replies_total", "requests answered with an error (incl. timeouts)", {}),
    "ssd_promotions": ("kvrelay_store_ssd_promotions_total", "chunks read back from SSD into the pool", {}),
    "aborts": ("kvrelay_store_aborts_total", "requests aborted by their publisher (their pulls fail at once)", {}),
    "mismatches": ("kvrelay_store_mismatched_pulls_total",
                   "pulls failed at once: their request's publisher reserved none of their chunks (another prompt)", {}),
    "local_pulls": ("kvrelay_store_directory_pulls_total",
                    "chunks same-host clients pulled through the shared directory (no round trip; in pulls too)",
                    {}),
}


# per tenant (tenants.py; label "_none": unsalted, "_other": past --max-tenant-labels): counter -> family
_TENANT_COUNTERS = {
    "lookup_chunks": ("kvrelay_store_tenant_lookup_chunks_total", "chunks the tenant's lookups asked for", {}),
    "lookup_chunks_hit": ("kvrelay_store_tenant_hit_chunks_total", "chunks the tenant's lookups found", {}),
    "committed_bytes": ("kvrelay_store_tenant_moved_bytes_total", "bytes of the tenant's chunks moved",
                        {"direction": "in"}),
    "pulled_bytes": ("kvrelay_store_tenant_moved_bytes_total", "bytes of the tenant's chunks moved",
                     {"direction": "out"}),
    "quota_evictions": ("kvrelay_store_tenant_evictions_total", "the tenant's chunks evicted by a rule of its own",
                        {"reason": "quota"}),
    "ttl_expiries": ("kvrelay_store_tenant_evictions_total", "the tenant's chunks evicted by a rule of its own",
                     {"reason": "ttl"}),
    "quota_refusals": ("kvrelay_store_tenant_quota_refusals_total", "reservations refused over the tenant's quota", {}),
    "purged_chunks": ("kvrelay_store_tenant_purged_chunks_total", "the tenant's chunks purged", {}),
}


def _tenant_families(tenants: dict[str, dict[str, float]], by_key: dict[str, int]):
    nb = GaugeMetricFamily("kvrelay_store_tenant_bytes", "bytes the tenant holds per tier", labels=["tenant", "tier"])
    quota = GaugeMetricFamily("kvrelay_store_tenant_quota_bytes", "the tenant's pool quota (0: none)",
                              labels=["tenant"])
    fams: dict[str, CounterMetricFamily] = {}
    for tenant, row in sorted(tenants.items()):
        for tier in ("reserved", "memory", "ssd"):
            nb.add_metric([tenant, tier], row.get(f"{tier}_bytes", 0))
        if "quota_bytes" in row:
            quota.add_metric([tenant], row["quota_bytes"])
        for key, (name, doc, labels) in _TENANT_COUNTERS.items():
            fam = fams.get(name) or fams.setdefault(name, CounterMetricFamily(name, doc, labels=["tenant", *labels]))
            fam.add_metric([tenant, *labels.values()], row.get(key, 0))
    yield nb
    yield quota
    yield from fams.values()
    recs = GaugeMetricFamily("kvrelay_store_ssd_records", "live SSD records per at-rest key id (0: plaintext): a "
                             "key may leave the key file once it has none", labels=["key_id"])
    for k, n in sorted(by_key.items()):
        recs.add_metric([k], n)
    yield recs


class StoreMetrics:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        register_auth_metrics(self.registry)  # kvrelay_auth_refused_total (kvrelay.security)
        self._stats = stats
        self.pull_latency = Histogram("kvrelay_store_pull_latency_seconds", "pull request to reply (includes waiting)",
                                      registry=self.registry,
                                      buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
        self.registry.register(self)
        self.ready = False
        self.heartbeat = time.monotonic()
        self._http: ThreadingHTTPServer | None = None

    def collect(self):
        s = self._stats()
        if not s:  # still recovering
            return
        nb = GaugeMetricFamily("kvrelay_store_bytes", "bytes per tier", labels=["tier"])
        nc = GaugeMetricFamily("kvrelay_store_chunks", "chunks per tier", labels=["tier"])
        for tier, b, c in (("memory", "memory_bytes", "memory_chunks"), ("ssd", "ssd_bytes", "ssd_chunks"),
                           ("reserved", "reserved_bytes", "reserved_chunks")):
            nb.add_metric([tier], s[b])
            nc.add_metric([tier], s[c])
        yield nb
        yield nc
        yield GaugeMetricFamily("kvrelay_store_pool_bytes", "pool capacity", value=s["pool_bytes"])
        yield GaugeMetricFamily("kvrelay_store_pins", "active pins and leases", value=s["pins"])
        rate = GaugeMetricFamily("kvrelay_store_ssd_gbps", "SSD throughput while busy", labels=["direction"])
        moved = CounterMetricFamily("kvrelay_store_ssd_bytes", "bytes moved to/from SSD", labels=["direction"])
        for direction, b, t in (("write", "ssd_bytes_written", "ssd_write_seconds"),
                                ("read", "ssd_bytes_read", "ssd_read_seconds")):
            rate.add_metric([direction], s[b] / s[t] / 1e9 if s[t] else 0.0)
            moved.add_metric([direction], s[b])
        yield rate
        yield moved
        lk, lh = s.get("lookups", 0), s.get("lookup_hits", 0)
        ck, ch = s.get("lookup_chunks", 0), s.get("lookup_chunks_hit", 0)
        yield GaugeMetricFamily("kvrelay_store_request_hit_rate", "lookups with any prefix hit / lookups",
                                value=lh / lk if lk else 0.0)
        yield GaugeMetricFamily("kvrelay_store_token_hit_rate", "chunks hit / chunks looked up",
                                value=ch / ck if ck else 0.0)
        fams: dict[str, CounterMetricFamily] = {}
        for key, (name, doc, labels) in _COUNTERS.items():
            fam = fams.get(name) or fams.setdefault(name, CounterMetricFamily(name, doc, labels=list(labels)))
            fam.add_metric(list(labels.values()), s.get(key, 0))
        yield from fams.values()
        yield from _tenant_families(s.get("tenants", {}), s.get("ssd_records_by_key", {}))
        rec = GaugeMetricFamily("kvrelay_store_recovery_chunks", "SSD records at start-up: recovered, or dropped "
                                "(torn, corrupt, or sealed records that do not open)", labels=["outcome"])
        rec.add_metric(["recovered"], s.get("recovered", 0))
        rec.add_metric(["dropped"], s.get("recover_dropped", 0))
        yield rec
        ev = s.get("events") or {}
        if ev:  # KV events (kvrelay.events): a full queue drops batches rather than slow the store
            fam = CounterMetricFamily("kvrelay_store_events_batches", "KV-event batches published, sent, and "
                                      "dropped with their queue full (subscribers recover by snapshot)",
                                      labels=["outcome"])
            for outcome in ("published", "sent", "dropped"):
                fam.add_metric([outcome], ev.get(f"batches_{outcome}", 0))
            yield fam

    def serve(self, port: int) -> int:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path == "/metrics":
                    body, code, ctype = generate_latest(metrics.registry), 200, "text/plain; version=0.0.4"
                elif self.path == "/healthz":
                    alive = not metrics.ready or time.monotonic() - metrics.heartbeat < 5.0  # recovering is alive
                    body, code, ctype = (b"ok\n" if alive else b"event loop stalled\n"), 200 if alive else 503, \
                        "text/plain"
                elif self.path == "/readyz":
                    body, code, ctype = (b"ready\n", 200, "text/plain") if metrics.ready else \
                        (b"recovering\n", 503, "text/plain")
                else:
                    body, code, ctype = b"not found: try /metrics, /healthz, /readyz\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="kvrelay-metrics", daemon=True).start()
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

