"""The SSD tier at rest: AES-GCM sealed records, bound to (chunk id, tenant); key rotation; the key file."""

from __future__ import annotations

import os
import shutil
import struct

import pytest
import xxhash
from prometheus_client import generate_latest

from tenant_helpers import CHUNK, chunk_keys_for, payload, put, read, wait_spilled
from kvrelay.keys import kid_of
from kvrelay.store.config import StoreConfig
from kvrelay.store.core import StoreCore
from kvrelay.store.crypto import keygen
from kvrelay.store.metrics import StoreMetrics
from kvrelay.store.pool import ALIGN
from kvrelay.store.ssd_format import HEAD2


def _records(ssd) -> dict[str, tuple[str, int]]:
    """chunk id -> (segment path, offset) of every live-looking record head on disk."""
    out = {}
    for seg in sorted(ssd.glob("seg-*.kvs")):
        data = seg.read_bytes()
        for off in range(0, len(data), ALIGN):
            if data[off:off + 4] == b"KVR2":
                klen = struct.unpack_from("<I", data, off + 4)[0]
                out[data[off + HEAD2.size:off + HEAD2.size + klen].decode()] = (str(seg), off)
    return out


def _transplant(ssd, src: str, dst: str) -> None:
    """An attacker with the disk: copy record ``src`` (head and payload) over record ``dst``, and rewrite its
    head so it names ``dst`` (a fresh head checksum: the head's xxh3 is not keyed)."""
    recs = _records(ssd)
    (sseg, soff), (dseg, doff) = recs[src], recs[dst]
    with open(sseg, "rb") as fh:
        fh.seek(soff)
        rec = bytearray(fh.read(ALIGN + CHUNK))
    klen = struct.unpack_from("<I", rec, 4)[0]
    assert len(dst) == klen
    rec[HEAD2.size:HEAD2.size + klen] = dst.encode()
    rec[ALIGN - 8:ALIGN] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(rec[:ALIGN - 8])))
    with open(dseg, "r+b") as fh:
        fh.seek(doff)
        fh.write(rec)


@pytest.mark.parametrize("encrypted", [False, True])
def test_moved_record_is_detected_only_when_sealed(make_core, tmp_path, encrypted):
    opts = {}
    if encrypted:
        keygen(str(tmp_path / "keys"))
        opts["at_rest_key"] = str(tmp_path / "keys")
    core = make_core(ssd=True, **opts)
    a, b = chunk_keys_for(list(range(16)), "alice")[:2]
    put(core, a, payload(1), tenant="alice")
    put(core, b, payload(2), tenant="alice")
    wait_spilled(core, [a, b])
    core.close()
    ssd = tmp_path / "ssd"
    blob = b"".join(p.read_bytes() for p in ssd.glob("seg-*.kvs"))
    assert (payload(1).numpy().tobytes()[:4096] in blob) is not encrypted  # ciphertext only, when sealed
    _transplant(ssd, kid_of(b), kid_of(a))
    core = make_core(ssd=True, **opts)
    got = read(core, a)
    if encrypted:  # bound to b's identity: it does not open as a -- corrupt, counted, and a miss
        assert core.recover_dropped == 1 and got is None and core.lookup([a]) == 0
        text = generate_latest(StoreMetrics(core.stats).registry).decode()
        assert 'kvrelay_store_recovery_chunks{outcome="dropped"} 1.0' in text
    else:  # negative control: unsealed, the moved record passes every check and b's bytes are served as a
        assert core.recover_dropped == 0 and got == payload(2).numpy().tobytes()
    assert read(core, b) == payload(2).numpy().tobytes()


def test_swapped_chunk_files_detected_and_not_served(make_core, tmp_path):
    """Two segment files swapped on disk (and the same with heads intact): every moved record is refused."""
    keygen(str(tmp_path / "keys"))
    core = make_core(ssd=True, at_rest_key=str(tmp_path / "keys"), ssd_segment_size="512KiB")
    keys = chunk_keys_for(list(range(96)), "alice")  # 12 x 64 KiB: two segments
    for i, k in enumerate(keys):
        put(core, k, payload(i), tenant="alice")
    wait_spilled(core, keys)
    core.close()
    segs = sorted((tmp_path / "ssd").glob("seg-*.kvs"))
    assert len(segs) >= 2
    tmp = segs[0].with_suffix(".tmp")
    shutil.move(segs[0], tmp)
    shutil.move(segs[1], segs[0])
    shutil.move(tmp, segs[1])
    core = make_core(ssd=True, at_rest_key=str(tmp_path / "keys"), ssd_segment_size="512KiB")
    assert core.recover_dropped >= 2 and core.counters["checksum_failures"] == 0
    served = {kid_of(k): read(core, k) for k in keys}
    for i, k in enumerate(keys):
        assert served[kid_of(k)] in (None, payload(i).numpy().tobytes())  # a miss, never another chunk's bytes
    assert sum(v is None for v in served.values()) == core.recover_dropped


def test_key_rotation_keeps_old_records_readable(make_core, tmp_path):
    kf = str(tmp_path / "keys")
    assert keygen(kf) == 1
    core = make_core(ssd=True, at_rest_key=kf)
    old = chunk_keys_for(list(range(16)), "alice")[0]
    put(core, old, payload(1), tenant="alice")
    wait_spilled(core, [old])
    core.close()
    assert keygen(kf) == 2  # rotate: key 2 seals from now on, key 1 still opens what it sealed
    core = make_core(ssd=True, at_rest_key=kf)
    assert core.recovered == 1 and read(core, old) == payload(1).numpy().tobytes()  # read back from SSD
    new = chunk_keys_for(list(range(16)), "bob")[0]
    put(core, new, payload(2), tenant="bob")
    wait_spilled(core, [new])
    assert core.ssd is not None and core.ssd.records_by_key() == {1: 1, 2: 1, 0: 0}
    core.close()
    # negative control: key 1 taken out of the file, the record it sealed no longer opens (a miss)
    lines = open(kf).read().splitlines()
    with open(kf, "w") as fh:
        fh.write(lines[-1] + "\n")
    core = make_core(ssd=True, at_rest_key=kf)
    assert core.recovered == 1 and core.recover_dropped == 1
    assert read(core, old) is None and read(core, new) == payload(2).numpy().tobytes()


def test_key_file_checks(tmp_path):
    kf = tmp_path / "keys"
    keygen(str(kf))
    assert oct(os.stat(kf).st_mode & 0o777) == "0o600"
    os.chmod(kf, 0o644)
    with pytest.raises(ValueError, match="mode 0644 lets other users read the keys; chmod 600"):
        StoreCore(StoreConfig(port=0, pool_size="1MiB", ssd_dir=str(tmp_path / "ssd"), at_rest_key=str(kf),
                              directory=False, ssd_segment_size="1MiB", ssd_size="2MiB", max_chunk_bytes="256KiB"))
    os.chmod(kf, 0o600)
    kf.write_text("1 abcd\n")
    with pytest.raises(ValueError, match="line 1"):
        keygen(str(kf))
    with pytest.raises(ValueError, match="at_rest_key encrypts the SSD tier"):
        StoreConfig(port=0, at_rest_key=str(kf))
