"""The client side: a user's program talking to its enclave over an attested session (not the host)."""

from constmig.client.session import EnclaveClient, UnsettledCalls, pin_now
from constmig.client.trust import Expect, KnownEnclaves, Pin, Trust

__all__ = ["EnclaveClient", "Expect", "KnownEnclaves", "Pin", "Trust", "UnsettledCalls", "pin_now"]
