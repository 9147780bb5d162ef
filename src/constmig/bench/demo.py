"""`constmig demo`: two agents, one enclave filled with real data, one migration, checked end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from constmig.bench.harness import migrate_under_load
from constmig.client import EnclaveClient, Trust
from constmig.errors import ConstmigError
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import launch_filled
from constmig.progress import console, print_figures

CLIENT_KEYS = 256


def run_demo(strategy: str = "stopcopy", heap: int = 512 << 20, app: str = "kvstore", fill: float = 0.9,
             quiet: bool = False, out: Path | None = None, name: str = "demo", tracker: str = "auto"
             ) -> dict[str, Any]:
    say = (lambda *a: None) if quiet else console.print
    with LocalCluster(2) as cluster:
        a, b = cluster.addrs
        say(f"agents: a={a}  b={b}  (state in {cluster.base})")
        t0 = time.perf_counter()
        trust = Trust.in_memory()  # the demo's own enclave: pinned at launch, never in the user's file
        written = launch_filled(a, name, app, heap, fill, seed=7, client_keys=CLIENT_KEYS, trust=trust)
        say(f"launched {app} and filled {fill:.0%} of its heap inside the enclave in "
            f"{time.perf_counter() - t0:.1f}s, plus {len(written)} client puts")
        if app == "kvstore":
            say("a client reads keys in a loop across the migration (its longest wait is client_gap_ms)")
        figures = migrate_under_load(name, a, b, strategy, tracker, app=app, seed=7, quiet=quiet, trust=trust)
        # A client that still knows only the old agent must be redirected and see the same state.
        c = EnclaveClient(a, name, trust=trust)  # the same instance, or refused
        if not written:  # an app without client keys: one call every app has, to be redirected by
            c.call("checksum")
        lost = [k for k, v in written.items() if c.call("get", k) != v]
        figures["redirected_to"] = c.addr
        c.close()
        if c.addr != b:
            raise ConstmigError(f"client was not redirected to the destination agent {b} (ended at {c.addr})")
        figures["verified"] = bool(figures["verified"] and not lost)
        figures["client_keys_checked"] = len(written)
        figures["client_keys_lost"] = len(lost)
        figures["fill_fraction"] = fill
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        from constmig.bench.plots import plot_demo

        plot_demo(figures, out / "demo.png")
        say(f"wrote {out / 'figures.json'} and {out / 'demo.png'}")
    if not quiet:
        print_figures(figures)
    return figures
