"""A client call that times out must not leave its late reply to be read as the next call's answer.

Found by the link-outage scenarios (test_faults.py): a call held up by an outage longer than the
client's timeout failed, and from then on every call on that EnclaveClient returned the answer of the
call before it (a `get` answered `True`, a `put` answered a dict): silent wrong answers. Cause:
FramedSocket turns the socket timeout into ChannelClosed("connection lost: timed out"), but AgentClient
and EnclaveClient keep the socket, whose stream still carries the late reply.
"""

from __future__ import annotations

import time

import pytest

from constmig.client import EnclaveClient
from constmig.errors import ConstmigError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]


def test_a_timed_out_call_does_not_answer_the_next_one() -> None:
    with LocalCluster(1) as c:
        a = c.addrs[0]
        request(a, {"op": "run", "name": "kv", "app": "kvstore", "heap": 128 << 20, "chunk_size": 1 << 20,
                    "config": {}})
        cl = EnclaveClient(a, "kv", timeout=0.05)
        try:
            with pytest.raises(ConstmigError):
                cl.call("fill", 0.9, 1)  # takes a few hundred ms: longer than the client waits
            time.sleep(2.0)  # the fill's reply is in the socket by now
            cl.timeout = 30.0
            assert cl.call("put", "k", "v") is True
            assert cl.call("get", "k") == b"v"
        finally:
            cl.close()
