"""A decode leg's light params may name the store its prefill publishes into (a store on every host)."""

import pytest

from kvrelay.engines.reference import api


def test_remote_store_is_read_from_the_light_params():
    body = {"request_id": "r1", "kv_transfer_params": {"do_remote_prefill": True,
                                                       "store_address": "tcp://198.18.0.2:5600"}}
    assert api.remote_store(body) == "tcp://198.18.0.2:5600"
    assert api.remote_store({"request_id": "r1", "kv_transfer_params": {"do_remote_prefill": True}}) == ""
    for bad in (5, "http://198.18.0.2:5600"):
        with pytest.raises(ValueError, match="is not a store's control address"):
            api.remote_store({"kv_transfer_params": {"do_remote_prefill": True, "store_address": bad}})
