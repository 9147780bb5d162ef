"""A multi-host network testbed on one machine: namespaces, shaped veth links, a delay relay, an agent per host."""

from constmig.testbed.bed import Testbed
from constmig.testbed.spec import LinkSpec, TestbedError

__all__ = ["LinkSpec", "Testbed", "TestbedError"]
