"""`constmig bench writes`: what each write-tracking mechanism costs, measured in one run, JSON out."""

from __future__ import annotations

import json
import subprocess
import sys

from constmig.enclave.dirty import enclave_problem, kernel_problem


def _cm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_bench_writes_measures_both_mechanisms_or_says_why_not():
    p = _cm("bench", "writes", "--heap", "16M", "--repeat", "2", "--json", "-")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for mech, why in (("kernel", kernel_problem()), ("enclave", enclave_problem())):
        if why is not None:
            assert doc["skipped"][mech] == why
            continue
        f = doc[mech]
        for key in ("arm_ms", "first_write_per_chunk_us", "every_page_once_ms", "scan_all_written_ms", "close_ms"):
            assert 0 < f[key]["min"] <= f[key]["median"] <= f[key]["max"], (mech, key, f[key])


def test_bench_writes_prints_one_line_per_mechanism():
    """Exactly as README.md names it (1 GiB, 3 repeats: a few seconds)."""
    p = subprocess.run(["constmig", "bench", "writes"], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["kernel", "enclave"]


def test_bench_writes_refuses_a_heap_that_is_not_whole_mib():
    p = _cm("bench", "writes", "--heap", "1500K")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--heap must be a whole number of MiB" in p.stderr
