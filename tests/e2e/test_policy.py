"""A destination running different enclave code is refused by attestation, not by luck."""

import os
import shutil
from pathlib import Path

import pytest

import constmig
from conftest import checksum, launch
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import migrate

pytestmark = pytest.mark.e2e


@pytest.mark.adversarial
def test_destination_with_other_code_is_refused(tmp_path, monkeypatch):
    # A copy of the package whose kvstore differs by one comment: its measurement differs.
    pkg = Path(constmig.__file__).parent
    shutil.copytree(pkg, tmp_path / "constmig", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "constmig" / "apps" / "kvstore.py", "a") as f:
        f.write("\n# patched by an attacker\n")
    with LocalCluster(1) as good:
        a = good.addrs[0]
        before = launch(a)
        monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # same CA as the good host, so only the code differs
        with LocalCluster(1, base_dir=tmp_path / "evil", ca_dir=good.ca_dir) as evil:
            b = evil.addrs[0]
            with pytest.raises(AgentError, match="measurement"):
                migrate("kv", a, b, "stopcopy")
        assert request(a, {"op": "status"})["enclaves"]["kv"]["state"] == "running"
        assert checksum(a) == before
