"""The store daemon's KV events: a chunk is announced in CPU_TIER1 once its last layer is committed (not
before), in DISK once spilled, described at the consumer's block size with the prompt's token ids; vLLM's
own classes decode the frames; after kill -9 and a restart on the same addresses, a subscriber that stayed
and one started afresh both hold exactly what survived on SSD, and follow new commits."""

from __future__ import annotations

import socket

import msgspec
import pytest
import torch
import zmq

from store_helpers import COMPAT, Daemon
from kvrelay.events.hashing import chain
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.events.view import EventView
from kvrelay.events.wire import MEDIUM_CPU_TIER1, MEDIUM_DISK
from kvrelay.keys import ChunkKey, block_hashes
from kvrelay.store.client import StoreClient
from kvrelay.transfer.wire import ChunkHeader, checksum

WAIT = 60.0
CT, BS, LAYERS, NB = 32, 16, 2, 4096  # chunk tokens, event block size, layers, bytes per chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(c: StoreClient, rid: str, prompt: list[int], layers=range(LAYERS)) -> None:
    hashes = block_hashes(prompt, CT, "m", COMPAT)
    keys = [(ChunkKey(h, layer, 0, 8), i) for i, h in enumerate(hashes) for layer in range(LAYERS)]
    c.reserve(rid, [(k, NB) for k, _ in keys], tokens=prompt)
    for k, i in keys:
        if k.layer not in layers:
            continue
        data = torch.full((NB,), (i * 7 + k.layer) % 251, dtype=torch.uint8)
        c.publish_buffer(k).copy_(data)
        c.commit(k, ChunkHeader(compat_hash=COMPAT, layer=k.layer, token_start=i * CT,
                                token_end=min(len(prompt), (i + 1) * CT), head_start=0, head_end=8, dtype="uint8",
                                nbytes=NB, checksum=checksum(data)))


@pytest.mark.timeout(400)
def test_store_events_commit_spill_restart(tmp_path):
    pytest.importorskip("vllm.distributed.kv_events", reason="vllm is not installed")
    from vllm.distributed.kv_events import BlockStored as VllmStored, KVEventBatch as VllmBatch

    ep, rep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    opts = dict(pool_size="4MiB", max_chunk_bytes="1MiB", ssd_size="16MiB", ssd_segment_size="4MiB",
                ssd_dir=tmp_path / "ssd", events=ep, events_replay=rep, events_block_size=BS, spill_max_delay=0)
    p1 = list(range(1000, 1064))  # two chunks, four event blocks
    p2 = list(range(2000, 2040))  # a whole chunk and a partial one: two event blocks + one part block
    want1, want2 = chain(p1, BS, COMPAT), chain(p2, BS, COMPAT)
    views = [EventView(), EventView()]
    subs: list[EventSubscriber] = []
    ctx = zmq.Context()
    raw = ctx.socket(zmq.SUB)  # frames as they are on the wire, for vLLM's decoder
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    d = Daemon(tmp_path, **opts).start()
    try:
        assert d.info["events"] == ep and d.info["events_replay"] == rep
        raw.connect(ep)
        for name, v in zip(("a", "b"), views, strict=True):
            subs.append(EventSubscriber(ep, rep, v.on_batch, on_resync=v.on_resync, source=name).start())
        assert all(s.wait_in_step(WAIT) for s in subs)
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            publish(c, "r1", p1, layers=[0])  # first layer only: nothing is whole yet
            publish(c, "r2", p2)
            assert views[0].wait_for(lambda v: v.hashes("a", MEDIUM_CPU_TIER1) == set(want2), WAIT)
            assert views[0].hashes("a", MEDIUM_CPU_TIER1).isdisjoint(want1)  # negative control: layer 1 missing
            publish(c, "r1b", p1, layers=[1])
            for name, v in zip(("a", "b"), views, strict=True):
                assert v.wait_for(lambda v, n=name: v.hashes(n, MEDIUM_CPU_TIER1) == set(want1 + want2), WAIT)
                assert v.wait_for(lambda v, n=name: v.hashes(n, MEDIUM_DISK) == set(want1 + want2), WAIT)
            blocks = views[0].blocks("a", MEDIUM_CPU_TIER1)
            assert blocks[want1[2]] == (want1[1], tuple(p1[32:48]))  # chained parent and the block's tokens
            assert blocks[want1[0]] == (None, tuple(p1[:16]))
        # vLLM's classes decode what went over the wire
        stored = []
        while raw.poll(0):
            topic, seq, payload = raw.recv_multipart()
            stored += [e for e in msgspec.msgpack.Decoder(VllmBatch).decode(payload).events
                       if isinstance(e, VllmStored)]
        assert {h for e in stored if e.medium == MEDIUM_CPU_TIER1 for h in e.block_hashes} == set(want1 + want2)
        assert all(e.block_size == BS and len(e.token_ids) == BS * len(e.block_hashes) for e in stored)
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            ev = c.stats()["events"]
        assert ev["batches_sent"] >= 5 and ev["batches_dropped"] == 0 and ev["groups_untracked"] == 0, ev

        subs[1].close()  # subscriber b is killed; a stays connected through the restart
        d.kill()
        d = Daemon(tmp_path, **opts).start()
        survived = set(want1 + want2)
        assert views[0].wait_for(lambda v: v.hashes("a", MEDIUM_DISK) == survived
                                 and not v.hashes("a", MEDIUM_CPU_TIER1), WAIT), subs[0].stats()
        assert subs[0].stats()["resyncs"] >= 2 and views[0].resyncs["a"] >= 2
        fresh = EventView()
        subs[1] = EventSubscriber(ep, rep, fresh.on_batch, on_resync=fresh.on_resync, source="b").start()
        assert fresh.wait_for(lambda v: v.hashes("b", MEDIUM_DISK) == survived, WAIT)
        p3 = list(range(3000, 3032))
        with StoreClient(d.address, compat_hash=COMPAT) as c:
            publish(c, "r3", p3)
        want3 = set(chain(p3, BS, COMPAT))
        for name, v in (("a", views[0]), ("b", fresh)):
            assert v.wait_for(lambda v, n=name: v.hashes(n, MEDIUM_CPU_TIER1) == want3, WAIT)
            assert v.hashes(name, MEDIUM_DISK) >= survived
    finally:
        for s in subs:
            s.close()
        raw.close(linger=0)
        ctx.term()
        d.cleanup()
