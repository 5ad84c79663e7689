"""Settings for the publisher and puller threads.

Owns: `quiet_torch_thread()`.  Each of those threads runs its torch work (pack, unpack, checksums) on one
intra-op thread: the engine's forward pass owns the cores, and an OpenMP team started from a side thread
competes with it for them (on these 2-core machines, with the forward pass).  Only this thread's OpenMP
setting changes: `torch.set_num_threads` would also change the default of every thread that has not run
torch yet (an engine thread started later), and vLLM's CPU worker patches it to a no-op.  Must not touch:
the engine's threads.
"""

from __future__ import annotations

import ctypes
from typing import Callable
import logging

import torch

log = logging.getLogger("kvrelay.connector.threads")


def _omp_set_num_threads() -> Callable[[int], object] | None:
    try:  # the OpenMP runtime torch loaded into this process (its symbols are global)
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None


_SET = _omp_set_num_threads()


def quiet_torch_thread() -> None:
    """Call first thing in a publisher or puller thread."""
    torch.get_num_threads()  # ATen initialises this thread's OpenMP setting on first use: let it do so now
    if _SET is None:
        log.warning("no OpenMP runtime found: kvrelay's transfer threads may use several cores each")
        return
    _SET(1)
