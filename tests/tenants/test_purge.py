"""Purge by tenant through the control plane and `kvrelay store purge`: the tenant's chunks are gone from
memory and disk (the pool file and the SSD files are read), the purge survives a restart (the journal), and
the audit log says who purged what."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.store.client import StoreClient
from kvrelay.store.pool import shm_path
from kvrelay.transfer.wire import ChunkHeader, checksum
from store_helpers import Daemon, wait_for
from tenant_helpers import COMPAT, chunk_keys_for, payload


def _publish(c: StoreClient, tenant: str, seed: int) -> list:
    keys = chunk_keys_for(list(range(seed, seed + 32)), tenant)
    c.reserve(f"pub-{tenant}", [(k, 65536) for k in keys], tenant=tenant)
    for i, k in enumerate(keys):
        data = payload(seed + i)
        c.publish_buffer(k).copy_(data)
        c.commit(k, ChunkHeader(compat_hash=COMPAT, layer=k.layer, token_start=0, token_end=16, head_start=0,
                                head_end=8, dtype="uint8", nbytes=65536, checksum=checksum(data)))
    return keys


def _on_disk(ssd: Path, pool: str) -> tuple[bytes, bytes]:
    return b"".join(p.read_bytes() for p in sorted(ssd.glob("seg-*.kvs"))), Path(shm_path(pool)).read_bytes()


@pytest.mark.timeout(180)
def test_purge_tenant_gone_from_memory_and_disk_survives_restart_and_is_audited(tmp_path):
    ssd, audit = tmp_path / "ssd", tmp_path / "audit.jsonl"
    opts = dict(pool_size="8MiB", max_chunk_bytes="1MiB", ssd_dir=ssd, ssd_size="16MiB", ssd_segment_size="4MiB",
                spill_max_delay=0, audit_log=audit)
    d = Daemon(tmp_path, **opts).start()
    try:
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            alice, bob = _publish(c, "alice", 0), _publish(c, "bob", 1000)
            wait_for(lambda: c.stats()["ssd_chunks"] == len(alice) + len(bob), 30, "everything spilled")
        marks = {t: [payload(s + i).numpy().tobytes()[:512] for i in range(len(ks))]
                 for t, s, ks in (("alice", 0, alice), ("bob", 1000, bob))}
        disk, pool = _on_disk(ssd, d.pool_name)
        assert all(m in disk and m in pool for m in marks["alice"])  # negative control: there before the purge
        out = subprocess.run([sys.executable, "-m", "kvrelay.cli", "store", "purge", "--tenant", "alice", "--store",
                              d.address, "--by", "ops-oncall"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"tenant": "alice", "by": "ops-oncall", "chunks": len(alice),
                                          "bytes": len(alice) * 65536, "skipped": 0}
        disk, pool = _on_disk(ssd, d.pool_name)
        assert not any(m in disk or m in pool for m in marks["alice"])  # overwritten in the pool and on SSD
        assert all(m in disk and m in pool for m in marks["bob"])
        journal = (ssd / "journal.log").read_bytes()
        assert b"purge" in journal and not any(k.block_hash.encode() in journal for k in alice)
        [line] = [json.loads(x) for x in audit.read_text().splitlines()]
        assert line["by"] == "ops-oncall" and line["tenant"] == "alice" and line["chunks"] == len(alice)
        assert line["bytes"] == len(alice) * 65536 and line["client"].startswith("kvrelay store purge")
        assert line["peer"].startswith(f"local uid={os.getuid()}(") and "pid=" in line["peer"]
        d.kill()  # SIGKILL, then the same SSD directory again
        d = Daemon(tmp_path, pool_name=d.pool_name, **opts).start()
        assert d.info["recovered"] == len(bob) and d.info["recover_dropped"] == 0
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            assert c.lookup(alice, tenant="alice") == 0 and c.lookup(bob, tenant="bob") == len(bob)
        # bad input: one line naming it, exit 2
        bad = subprocess.run([sys.executable, "-m", "kvrelay.cli", "store", "purge", "--tenant", "alice", "--store",
                              "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "must look like tcp://" in bad.stderr
    finally:
        d.cleanup()
