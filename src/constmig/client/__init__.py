"""The client side: a user's program talking to its enclave over an attested session (not the host)."""

from constmig.client.session import EnclaveClient
from constmig.client.trust import Expect, KnownEnclaves, Trust

__all__ = ["EnclaveClient", "Expect", "KnownEnclaves", "Trust"]
