"""deploy/prometheus/ as shipped: the distribution's promtool accepts the configuration and the rules,
the rules' unit tests pass, and every series a rule reads is one an agent exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from constmig.host.metrics import AgentMetrics, HostFigures

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus; .ci/run "
                                    "installs it): the shipped rules are checked with the real one")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@needs_promtool
def test_promtool_accepts_the_configuration_and_its_rules():
    p = promtool("check", "config", "prometheus.yml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS: 1 rule files found" in p.stdout and "is valid prometheus config file" in p.stdout


@needs_promtool
def test_the_rules_unit_tests_pass():
    p = promtool("test", "rules", "rules_test.yml")
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


@needs_promtool
def test_promtool_would_catch_a_broken_rule(tmp_path):
    """The check above can fail: a rule whose alert fires on the wrong series does not pass its test."""
    broken = (DEPLOY / "rules.yml").read_text().replace('outcome=~"failed|stranded"', 'outcome=~"failed"')
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(DEPLOY / "rules_test.yml", tmp_path)
    p = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "a stranded migration fires too" in p.stdout + p.stderr


def exported() -> set[str]:
    """The series names an agent's registry serves (families with no sample yet count by name)."""
    figures = HostFigures(checkpoint_age={"kv": 1.0}, directory=(True, 0))
    m = AgentMetrics(lambda: [("kv", "running", 1 << 20)], figures=lambda: figures)
    names: set[str] = set()
    for family in m.registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


def test_every_series_the_rules_read_is_exported():
    text = (DEPLOY / "rules.yml").read_text()
    wanted = {n for n in re.findall(r"\bconstmig_[a-z_]+", text)}
    assert {"constmig_migrations_total", "constmig_downtime_seconds_bucket", "constmig_migration_elapsed_seconds",
            "constmig_host_memory_promised_bytes"} <= wanted
    missing = wanted - exported()
    assert not missing, f"rules.yml reads series no agent exports: {sorted(missing)}"
