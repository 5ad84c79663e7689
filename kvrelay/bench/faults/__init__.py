"""`kvrelay bench faults`: faults injected into a live `kvrelay up` cluster under streaming load, with every
answer checked against a colocated engine's.

Owns: the fault scenarios, the load they run under, and their figures.  Must not touch: the cluster's
processes except to break them (kvrelay/launcher.py and kvrelay/supervisor.py run and restart them).

Each scenario starts its own cluster (``kvrelay up --transport tcp``, 2 prefill and 2 decode reference
engines, the router, the store, all supervised), warms it up, records a baseline (file descriptors and
threads of every process, /dev/shm), then sends ``concurrency`` streaming requests at a time through the
router with the official ``openai`` client while the fault is injected.  Per scenario it reports:
  sent, correct (token-identical to the colocated engine), clear_errors (the client raised an API error),
  wrong (finished without error but different: must be 0), hung (no answer within the client's timeout:
  must be 0), leaks (after the load: KV blocks not free, store reservations and pins, kvrelay shm segments
  beyond the live pool, file descriptors and threads grown in processes that were not restarted: must be
  0), and recovery_s (fault to the first probe request answered correctly again; for the store, answered
  with its KV pulled from the store again; target <= 5 s).  The client-disconnect scenario also watches
  the store's pins and reserved bytes over time: both must be back to their values before a round within
  1 s of its last abort (a release left to a lease or a reservation TTL is a leak that lasts).

Reading path: suite.py (one scenario from start to figures; the suite) -> scenarios.py (the faults) ->
cluster.py (the `kvrelay up` cluster and a colocated engine) and load.py (the checked streaming load) ->
recovery.py (probes and waits for service), leaks.py (what must be given back), holdings.py (the store's
pins and reserved bytes over time) -> figures.py (what is reported).
"""

from kvrelay.bench.faults.cluster import UpCluster
from kvrelay.bench.faults.figures import Figures, Outcome
from kvrelay.bench.faults.load import Load
from kvrelay.bench.faults.scenarios import QUICK, SCENARIOS
from kvrelay.bench.faults.suite import run, run_scenario

__all__ = ["Figures", "Load", "Outcome", "QUICK", "SCENARIOS", "UpCluster", "run", "run_scenario"]
