"""Publisher -> subscriber over loopback: in-order delivery, a lost message refilled by replay, a dropped
batch (full queue) recovered by a snapshot, a publisher restarted on the same ports resynced, and vLLM's
own publisher followed (replay from its buffer)."""

import socket

import pytest

from kvrelay.events import wire as w
from kvrelay.events.publisher import EventPublisher
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.events.view import EventView
from events_helpers import Owner
from waiting import wait_until

WAIT = 20.0  # generous: the test machine is shared and loaded


class LossyPublisher(EventPublisher):
    """Loses the live copy of chosen seqs (as a network would); they stay in the replay buffer."""

    lose: set[int] = set()

    def _send_live(self, seq: int, payload: bytes) -> None:
        if seq not in self.lose:
            super()._send_live(seq, payload)


def _pair(owner: Owner, cls=EventPublisher, endpoint="tcp://127.0.0.1:0", replay="tcp://127.0.0.1:0", **kw):
    owner.pub = cls(endpoint, replay, topic="kv", snapshot=owner.snapshot, state_lock=owner.lock, **kw)
    view = EventView()
    sub = EventSubscriber(owner.pub.endpoint, owner.pub.replay_endpoint, view.on_batch, "kv",
                          on_resync=view.on_resync, source="store")
    return view, sub


def _held(owner: Owner):
    return set(owner.held)


def test_in_order_and_lost_message_replayed():
    owner = Owner()
    LossyPublisher.lose = {3}
    view, sub = _pair(owner, LossyPublisher)
    owner.store(1, [1, 2])  # before start(): in the snapshot of seq 0
    owner.pub.start()
    sub.start()
    try:
        assert sub.wait_in_step(WAIT)
        # let the subscriber's catch-up replay after its first sync pass first: seq 3 must then be refilled
        # by gap detection (on a loaded machine the catch-up could otherwise refill it before any gap shows)
        wait_until(lambda: sub._catch_up_at is None, WAIT, "the subscriber's catch-up replay")
        for h in range(2, 8):
            owner.store(h, [h])
        owner.remove(2)
        assert view.wait_for(lambda v: v.hashes("store", w.MEDIUM_CPU_TIER1) == _held(owner), WAIT), sub.stats()
        st = sub.stats()
        assert st["gaps"] >= 1 and st["replayed"] >= 1, st  # seq 3 never arrived live
        assert view.blocks("store", w.MEDIUM_CPU_TIER1)[5] == (None, (5,))
        assert st["unrecoverable_gaps"] == 0
    finally:
        sub.close()
        owner.pub.close()


def test_dropped_batch_recovered_by_snapshot():
    owner = Owner()
    view, sub = _pair(owner, max_queue=1)
    owner.pub.start()
    sub.start()
    try:
        assert sub.wait_in_step(WAIT)
        for h in range(1, 40):  # faster than the sender empties its one queue slot
            owner.store(h, [h])
        assert owner.pub.stats()["batches_dropped"] > 0
        # a live seq after the hole makes the subscriber notice it (store() is None while the queue is full)
        wait_until(lambda: owner.store(100, [100]) is not None, WAIT, "a live batch sent after the dropped ones")
        assert view.wait_for(lambda v: v.hashes("store", w.MEDIUM_CPU_TIER1) == _held(owner), WAIT), sub.stats()
        assert sub.stats()["snapshots"] >= 2  # the first sync and the recovery
    finally:
        sub.close()
        owner.pub.close()


def test_restarted_publisher_same_ports_resyncs():
    owner = Owner()
    view, sub = _pair(owner)
    owner.pub.start()
    sub.start()
    try:
        for h in range(1, 6):
            owner.store(h, [h])
        assert view.wait_for(lambda v: v.hashes("store", w.MEDIUM_CPU_TIER1) == {1, 2, 3, 4, 5}, WAIT)
        ep, rep = owner.pub.endpoint, owner.pub.replay_endpoint
        owner.pub.close()
        survivor = Owner()  # the new epoch holds only 4 and 9, and has published more than the old one
        survivor.held = {4: [4], 9: [9]}
        survivor.pub = EventPublisher(ep, rep, topic="kv", snapshot=survivor.snapshot, state_lock=survivor.lock)
        survivor.pub.start()
        for h in range(20, 30):
            survivor.store(h, [h])
            survivor.remove(h)
        assert view.wait_for(lambda v: v.hashes("store", w.MEDIUM_CPU_TIER1) == {4, 9}, WAIT), sub.stats()
        assert sub.stats()["reconnects"] >= 1 and view.resyncs["store"] >= 2
        survivor.pub.close()
    finally:
        sub.close()


def test_follows_vllms_own_publisher(tmp_path):
    kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vllm is not installed")
    with socket.socket() as s:  # a free port for vLLM's replay socket, which binds what it is given
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # vLLM's PUB binds only wildcard or ipc endpoints (it connects to tcp://HOST:PORT): ipc keeps it local
    endpoint = f"ipc://{tmp_path}/kv-events"
    pub = kv_events.ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=f"tcp://127.0.0.1:{port}", topic="kv")
    view = EventView()

    def ev(h):
        return kv_events.BlockStored(block_hashes=[h], parent_block_hash=None, token_ids=[h], block_size=1,
                                     lora_id=None, medium="GPU", lora_name=None)
    try:
        for h in range(3):  # before the subscriber exists: only replay from vLLM's buffer brings these
            pub.publish(kv_events.KVEventBatch(ts=0.0, events=[ev(h)]))
        sub = EventSubscriber(endpoint, f"tcp://127.0.0.1:{port}", view.on_batch, "kv",
                              on_resync=view.on_resync, source="vllm")
        sub.start()
        try:
            assert sub.wait_in_step(WAIT)
            pub.publish(kv_events.KVEventBatch(ts=0.0, events=[ev(3)]))
            assert view.wait_for(lambda v: v.hashes("vllm", "GPU") == {0, 1, 2, 3}, WAIT), sub.stats()
            assert sub.stats()["snapshots"] == 0 and sub.stats()["replayed"] >= 3
        finally:
            sub.close()
    finally:
        pub.shutdown()
