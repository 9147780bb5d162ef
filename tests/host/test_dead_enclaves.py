"""What `constmig ls` tells an operator about a dead agent's enclaves: the commands that bring each back
on the host whose platform holds its lineage (the e2e test runs them as printed), or that free its name."""

from __future__ import annotations

import shlex

from constmig.host.fleet import Stray, revival

URL = "http://127.0.0.1:2379"


def test_the_advice_restarts_the_host_that_sealed_the_checkpoint_then_restores_there():
    agent = {"host_id": "a", "state_dir": "/srv/host a", "ca_dir": "/etc/constmig ca", "listen": "10.0.0.1:7001"}
    dead = [Stray("kv1", "10.0.0.1:7001", "dead", "/srv/host a/checkpoints/kv1.v4.ckpt", agent),
            Stray("kv2", "10.0.0.1:7001", "dead", None, agent)]
    lines = revival(dead, URL)
    assert lines[0].startswith("host a (10.0.0.1:7001) is gone; its enclaves' checkpoints restore only there")
    assert shlex.split(lines[1]) == ["constmig", "agent", "--listen", "10.0.0.1:7001", "--state-dir", "/srv/host a",
                                     "--host-id", "a", "--ca-dir", "/etc/constmig ca", "--etcd", URL]
    assert shlex.split(lines[2]) == ["then:", "constmig", "restore", "/srv/host a/checkpoints/kv1.v4.ckpt",
                                     "--agent", "10.0.0.1:7001", "--name", "kv1"]
    assert "kv2: no checkpoint of it there is recorded" in lines[3] and "status --agent 10.0.0.1:7001" in lines[3]
    assert lines[-1].endswith(f"constmig forget NAME --etcd {URL}")
    assert not any("elsewhere" in line for line in lines)


def test_one_agent_line_per_host_and_none_without_its_record():
    b = {"host_id": "b", "state_dir": "/b"}
    lines = revival([Stray("x", "h:1", "dead", "/b/x.v1.ckpt", b), Stray("y", "h:2", "dead", "/c/y.v1.ckpt", {}),
                     Stray("z", "h:1", "dead", "/b/z.v2.ckpt", b)], URL)
    assert sum(line.strip().startswith("constmig agent") for line in lines) == 1  # h:1 once, h:2 has no record
    assert "the agent at h:2 is gone (the directory has no record of its state folder)" in "\n".join(lines)
    assert [line.split()[3] for line in lines if "constmig restore" in line] == ["/b/x.v1.ckpt", "/b/z.v2.ckpt",
                                                                                  "/c/y.v1.ckpt"]
    assert revival([], URL) == []


def test_for_a_store_with_tls_the_agent_line_says_it_needs_the_same_settings():
    agent = {"host_id": "a", "state_dir": "/srv/a"}
    lines = revival([Stray("kv1", "h:1", "dead", "/srv/a/checkpoints/kv1.v1.ckpt", agent)], "https://etcd:2379")
    assert "with its state folder (and the CONSTMIG_ETCD_* settings this store needs):" in lines[0]
    assert "CONSTMIG_ETCD_" not in revival([Stray("kv1", "h:1", "dead", None, agent)], URL)[0]
