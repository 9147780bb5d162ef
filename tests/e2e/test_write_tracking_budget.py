"""The enclave's write tracker refuses, before anything starts, a heap whose chunks could need more
mappings than vm.max_map_count leaves: one line at the agent and at the command line,
and the enclave keeps running with all its data. The heap here has one chunk more than the limit (4 GiB
of 64 KiB chunks under the default 65530), reserved, hardly touched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import checksum, running_at
from constmig.enclave.dirty import enclave_problem
from constmig.errors import AgentError
from constmig.host.orchestrate import launch_filled, migrate
from constmig.units import available_memory

CHUNK = 64 << 10
with open("/proc/sys/vm/max_map_count") as _f:
    LIMIT = int(_f.read())
HEAP = (LIMIT + 1) * CHUNK

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(enclave_problem() is not None, reason=f"enclave handler: {enclave_problem()}"),
              pytest.mark.skipif(HEAP > 8 << 30, reason=f"vm.max_map_count {LIMIT} makes the heap too big to reserve"),
              pytest.mark.skipif(available_memory() < 2 * HEAP, reason="not memory for two such heaps")]


@pytest.mark.timeout(180)
def test_a_heap_the_map_budget_cannot_track_is_refused_in_one_line(cluster) -> None:
    a, b = cluster.addrs
    launch_filled(a, "kv", "kvstore", HEAP, 0.001, seed=3, chunk_size=CHUNK)
    before = checksum(a)
    with pytest.raises(AgentError) as e:
        migrate("kv", a, b, "precopy", timeout=60, write_tracking="enclave")
    says = str(e.value)
    assert "\n" not in says and "vm.max_map_count" in says and f"{HEAP // CHUNK:,} chunks" in says, says
    assert "keeps running here" in says, says
    # the command line: the same line, no traceback
    p = subprocess.run([sys.executable, "-m", "constmig", "migrate", "kv", "--from", a, "--to", b,
                        "--strategy", "precopy", "--write-tracking", "enclave"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "vm.max_map_count" in p.stderr, p.stderr
    assert running_at(a) and checksum(a) == before
