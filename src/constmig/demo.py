"""`constmig demo`: two agents, one enclave filled with real data, one migration, checked end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from constmig.errors import ConstmigError
from constmig.host.client import EnclaveClient, request
from constmig.host.cluster import LocalCluster
from constmig.migration.orchestrate import migrate_with_progress
from constmig.progress import console, print_figures

CLIENT_KEYS = 256


def run_demo(strategy: str = "stopcopy", heap: int = 512 << 20, app: str = "kvstore", fill: float = 0.9,
             quiet: bool = False, out: Path | None = None, name: str = "demo") -> dict[str, Any]:
    say = (lambda *a: None) if quiet else console.print
    with LocalCluster(2) as cluster:
        a, b = cluster.addrs
        say(f"agents: a={a}  b={b}  (state in {cluster.base})")
        request(a, {"op": "run", "name": name, "app": app, "heap": heap, "config": {}})
        c = EnclaveClient(a, name)
        t0 = time.perf_counter()
        filled = c.call("fill", fill, 7)
        say(f"filled {app} inside the enclave in {time.perf_counter() - t0:.1f}s: {filled}")
        written = {}
        if app == "kvstore":
            for i in range(CLIENT_KEYS):
                key, value = f"client-{i}", f"value-{i}-{'x' * (i % 50)}"
                c.call("put", key, value)
                written[key] = value.encode()
        before = c.call("checksum")
        c.close()
        figures = migrate_with_progress(name, a, b, strategy, quiet=quiet)
        # A client that still knows only the old agent must be redirected and see the same state.
        c = EnclaveClient(a, name)
        after = c.call("checksum")
        lost = [k for k, v in written.items() if c.call("get", k) != v]
        figures["redirected_to"] = c.addr
        c.close()
        if c.addr != b:
            raise ConstmigError(f"client was not redirected to the destination agent {b} (ended at {c.addr})")
        figures["verified"] = bool(after == before and not lost)
        figures["client_keys_checked"] = len(written)
        figures["client_keys_lost"] = len(lost)
        figures["fill_fraction"] = fill
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        from constmig.plots import plot_demo

        plot_demo(figures, out / "demo.png")
        say(f"wrote {out / 'figures.json'} and {out / 'demo.png'}")
    if not quiet:
        print_figures(figures)
    return figures
