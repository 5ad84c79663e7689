"""KV events over CURVE: a subscriber with the cluster's keys follows a keyed publisher; one with another
cluster's keys gets nothing and is counted; the publisher closes promptly (its ZAP thread is released)."""

from __future__ import annotations

import threading

import pytest

from kvrelay.events import wire as w
from kvrelay.events.publisher import EventPublisher
from kvrelay.events.subscriber import EventSubscriber
from kvrelay.events.view import EventView
from kvrelay.security import metrics
from events_helpers import Owner
from waiting import wait_until


WAIT = 20.0


@pytest.mark.timeout(120)
def test_keyed_subscriber_follows_and_an_intruder_is_refused(keys, other_keys):
    owner = Owner()
    owner.pub = EventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="kv", snapshot=owner.snapshot,
                               state_lock=owner.lock, keys=keys)
    member, intruder = EventView(), EventView()
    subs = [EventSubscriber(owner.pub.endpoint, owner.pub.replay_endpoint, view.on_batch, "kv",
                            on_resync=view.on_resync, source="store", keys=k)
            for view, k in ((member, keys), (intruder, other_keys))]
    before = metrics.total("events")
    owner.pub.start()
    for s in subs:
        s.start()
    try:
        assert subs[0].wait_in_step(WAIT)
        for h in range(1, 6):
            owner.store(h, [h])
        assert member.wait_for(lambda v: v.hashes("store", w.MEDIUM_CPU_TIER1) == set(owner.held), WAIT)
        wait_until(lambda: metrics.total("events") > before, WAIT, "the intruder's refused handshake counted")
        assert not intruder.hashes("store", w.MEDIUM_CPU_TIER1)  # it received nothing
    finally:
        for s in subs:
            s.close()
        closer = threading.Thread(target=owner.pub.close)
        closer.start()
        closer.join(15)
        assert not closer.is_alive(), "the keyed publisher's close hung (ZAP thread not released?)"
