"""The decode leg's light form, sent at the same time as its prefill leg."""

import pytest

from kvrelay.engines.reference import api


def test_wants_remote_prefill():
    assert api.wants_remote_prefill({"request_id": "r1", "kv_transfer_params": {"do_remote_prefill": True}})
    assert not api.wants_remote_prefill({"kv_transfer_params": {"do_remote_decode": True}})
    assert not api.wants_remote_prefill({"prompt": "x"})
    with pytest.raises(ValueError, match="needs the prefill leg's 'request_id'"):
        api.wants_remote_prefill({"kv_transfer_params": {"do_remote_prefill": True}})
