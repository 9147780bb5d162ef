"""What a scrape reads beyond the enclaves' rows (Roster.figures, metrics._Host): migrations in flight,
checkpoint ages, and each enclave death counted once, by signal. In process: no agent, no enclave."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from constmig.host.metrics import AgentMetrics, HostFigures
from constmig.host.roster import Hosted, Roster
from constmig.host.status import Status as S
from constmig.host.status import StatusCell
from constmig.wire import control


def hosted(name: str, status: S = S.RUNNING, returncode: int | None = None) -> Hosted:
    handle = SimpleNamespace(spec=control.LaunchSpec(name, "kvstore", 1 << 20),
                             proc=SimpleNamespace(returncode=returncode, pid=os.getpid()))
    return Hosted(handle, StatusCell(status))  # type: ignore[arg-type]


def samples(m: AgentMetrics) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_in_flight_checkpoint_age_and_deaths(tmp_path: Path) -> None:
    roster = Roster(tmp_path, "a", "h:1")
    roster.died = {"old": {}}  # died with the previous agent here
    out = hosted("out")
    out.outgoing = control.OutgoingProgress(to="h:2", strategy="stopcopy", started=time.time() - 5)
    roster.enclaves.update(out=out, coming=hosted("coming", S.INCOMING), kv=hosted("kv"))
    roster.checkpoints.mkdir()
    ckpt = roster.checkpoints / "kv.v3.ckpt"
    ckpt.write_bytes(b"")
    os.utime(ckpt, (time.time() - 100, time.time() - 100))
    m = AgentMetrics(roster.rows, roster.outgoing, roster.figures)
    got = samples(m)
    assert got[("constmig_migrations_in_flight", (("direction", "out"),))] == 1
    assert got[("constmig_migrations_in_flight", (("direction", "in"),))] == 1
    assert 99 <= got[("constmig_checkpoint_age_seconds", (("enclave", "kv"),))] < 110
    assert ("constmig_checkpoint_age_seconds", (("enclave", "out"),)) not in got  # it has none
    assert 5 <= got[("constmig_migration_elapsed_seconds", (("enclave", "out"),))] < 15
    deaths = {r: got[("constmig_enclave_deaths_total", (("reason", r),))] for r in ("SIGKILL", "exit", "with-agent")}
    assert deaths == {"SIGKILL": 0, "exit": 0, "with-agent": 1}

    roster.enclaves["kv"] = hosted("kv", returncode=-9)  # killed
    roster.enclaves["crashed"] = hosted("crashed", returncode=-11)
    for _ in range(2):  # counted once, however often scraped
        got = samples(m)
        assert got[("constmig_enclave_deaths_total", (("reason", "SIGKILL"),))] == 1
        assert got[("constmig_enclave_deaths_total", (("reason", "SIGSEGV"),))] == 1
        assert got[("constmig_enclave_deaths_total", (("reason", "with-agent"),))] == 1
    assert got[("constmig_host_memory_available_bytes", ())] > 0


def test_the_directorys_health_only_with_a_directory(tmp_path: Path) -> None:
    roster = Roster(tmp_path, "a", "h:1")
    health: list = [None]

    def figures() -> HostFigures:
        return HostFigures(directory=health[0])

    m = AgentMetrics(roster.rows, roster.outgoing, figures)
    assert not [k for k in samples(m) if k[0].startswith("constmig_directory")]
    health[0] = (False, 3)  # the store is away; three entries to fix
    got = samples(m)
    assert got[("constmig_directory_up", ())] == 0 and got[("constmig_directory_unsynced_enclaves", ())] == 3
