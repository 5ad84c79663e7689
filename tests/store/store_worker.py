"""A separate client process for the store tests: publishes or pulls seeded chunks, exits 0 if byte-exact.

usage: python store_worker.py publish|pull ADDRESS TRANSPORT FIRST_SEED COUNT NBYTES [LAYERS]
"""

from __future__ import annotations

import os
import sys
import time

import torch

from kvrelay.store.client import StoreClient
from store_helpers import COMPAT, make_chunk  # PYTHONPATH from childenv.child_env (the spawning test)


# a puller may start well before its publisher (a fresh interpreter importing torch: 20 s and more on a
# loaded 2-core machine); the test's own timeout bounds the whole
PULL_WAIT_S = 60.0


def main() -> int:
    mode, address, transport, first, count, nbytes = sys.argv[1:7]  # noqa: E501
    first, count, nbytes = int(first), int(count), int(nbytes)
    with StoreClient(address, transport=transport, compat_hash=COMPAT, name=f"{mode}-{first}") as c:
        chunks = [make_chunk(s, nbytes) for s in range(first, first + count)]
        if mode == "publish":
            c.reserve(f"req-{first}", [(k, h.nbytes) for k, h, _ in chunks])
            for k, h, d in chunks:
                c.publish_buffer(k).copy_(d)
                c.commit(k, h)
        else:
            out = torch.empty(nbytes, dtype=torch.uint8)
            scratch = torch.empty(2 * nbytes + 4096, dtype=torch.uint8)
            c.register_buffer(scratch)  # half the pulls go straight into registered memory
            for i, (k, h, d) in enumerate(chunks):
                if i % 2:
                    got = c.pull(k, scratch[4096:4096 + nbytes], deadline=time.monotonic() + PULL_WAIT_S)
                    if got != h or not torch.equal(scratch[4096:4096 + nbytes], d):
                        print(f"mismatch on chunk {k} (registered)", file=sys.stderr)
                        return 1
                    continue
                got = c.pull(k, out, deadline=time.monotonic() + PULL_WAIT_S)
                if got != h or not torch.equal(out, d):
                    print(f"mismatch on chunk {k}", file=sys.stderr)
                    return 1
            # the batched pull: registered outs move in one multi-descriptor transfer, the rest via staging
            many = torch.empty(count * (nbytes + 4096), dtype=torch.uint8)
            c.register_buffer(many)
            outs = [many[i * (nbytes + 4096):i * (nbytes + 4096) + nbytes] if i % 2 else
                    torch.empty(nbytes, dtype=torch.uint8) for i in range(count)]
            got = c.pull_many([k for k, _, _ in chunks], outs, deadline=time.monotonic() + PULL_WAIT_S)
            for (k, h, d), g, o in zip(chunks, got, outs, strict=True):
                if g != h or not torch.equal(o, d):
                    print(f"pull_many mismatch on chunk {k}", file=sys.stderr)
                    return 1
    return 0


if __name__ == "__main__":
    rc = main()
    if sys.argv[3] == "nixl":
        # kvrelay.transfer's nixl endpoint segfaults at interpreter exit even after close() (reproduced
        # without the store: two endpoints, one read, close, exit -> SIGSEGV).  The work is done and
        # checked above; leave without running the finalizers that crash.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
