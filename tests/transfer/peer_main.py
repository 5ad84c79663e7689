"""A peer process for the conformance suite: one endpoint with seeded regions, driven by notifications.

    python peer_main.py TRANSPORT NAME COMPAT SEED SIZE [SIZE...]

Prints one JSON line {"address", "pid", "regions"} when ready.  Commands (notifications from a
connected peer): ``sum:<rid>`` -> answers ``sum:<rid>:<xxh3-64 hex>`` of the region; ``exit``.
Exits when stdin closes (its parent died), so a crashed test never leaves it behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np
import xxhash


def region_bytes(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed * 1000 + index).integers(0, 256, size, dtype=np.uint8)


def main() -> None:
    from kvrelay.transfer import create_transport

    transport, name, compat, seed, *sizes = sys.argv[1:]
    ep = create_transport(transport, name, compat)
    regions = []
    views = {}
    for i, size in enumerate(map(int, sizes)):
        info, view = ep.alloc(size)
        if hasattr(view, "is_cuda"):  # nvlink: a CUDA tensor
            import torch
            view.copy_(torch.from_numpy(region_bytes(int(seed), i, size)))
        else:
            np.frombuffer(view, np.uint8)[:] = region_bytes(int(seed), i, size)
        regions.append(info.region_id)
        views[info.region_id] = view
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps({"address": ep.address, "pid": os.getpid(), "regions": regions}), flush=True)
    while not stop.is_set():
        for n in ep.get_notifications(timeout=0.2):
            msg = n.payload.decode()
            peer = next((p for p in ep.peers() if p.name == n.peer and p.info.epoch == n.epoch), None)
            if msg == "exit":
                stop.set()
            elif msg.startswith("sum:") and peer is not None:
                rid = int(msg[4:])
                data = views[rid].cpu().numpy() if hasattr(views[rid], "is_cuda") else views[rid]
                ep.notify(peer, f"sum:{rid}:{xxhash.xxh3_64_hexdigest(data)}".encode())
            elif msg.startswith("echo:") and peer is not None:
                ep.notify(peer, msg[5:].encode())
    ep.close()


if __name__ == "__main__":
    main()
