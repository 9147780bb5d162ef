#!/usr/bin/env python3
"""Mutation testing of constmig's security-critical modules with cosmic-ray (not part of the CI run).

    pip install ".[test,mutation]"
    python tools/mutation.py                          # every module in MODULES, one after another
    python tools/mutation.py --module wire/handshake.py --module migration/ledger.py
    python tools/mutation.py --jobs 2                 # two modules at once (one copy of the tree each)
    python tools/mutation.py --list                   # modules, their test files and mutant counts
    python tools/mutation.py --known                  # only the hand-written mutants in KNOWN (issue 19)
    python tools/mutation.py --workdir W ...          # keep copies and sessions in W (default: a temp folder)
    python tools/mutation.py --workdir W --survivors-only --module ...   # after adding tests: retest
                                                      # only W's survivors (the module must be unchanged)

Each module is mutated in a private copy of src/ and tests/ (a temporary folder, never this checkout),
and its tests run with PYTHONPATH pointing at that copy, so enclave, agent and pager subprocesses that
`import constmig` see the mutant too. Each module runs only the fast test files that should catch its
bugs (MODULES below); `-x` stops a run at the first failing test, so a killed mutant is cheap. The run
prints one line per module (killed / survived / timeouts / score) and a diff of every surviving mutant,
and writes the same as JSON with --json FILE. Lines that carry `# pragma: no mutate` are not mutated.
See docs/mutation.md for the last run and why each remaining survivor is harmless.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/constmig"

# module (relative to src/constmig) -> the test files that should catch its bugs. Fast, mostly in-process.
MODULES: dict[str, list[str]] = {
    "wire/handshake.py": ["tests/wire/test_handshake.py"],
    "migration/ledger.py": ["tests/migration/test_ledger.py"],
    "migration/protocol.py": ["tests/migration/test_protocol.py"],
    "wire/aead.py": ["tests/wire/test_aead.py", "tests/wire/test_channel.py"],
    "wire/records.py": ["tests/wire/test_records.py", "tests/wire/test_channel.py"],
    "enclave/lifecycle.py": ["tests/enclave/test_lifecycle.py"],
    "tee/sim.py": ["tests/tee/test_sim.py", "tests/wire/test_handshake.py"],
    "tee/counters.py": ["tests/tee/test_counters.py"],
    "tee/measure.py": ["tests/tee/test_backend.py", "tests/tee/test_sim.py"],
    "tee/backend.py": ["tests/tee/test_backend.py", "tests/tee/test_sim.py"],
    "enclave/persist.py": ["tests/enclave/test_persist.py"],
    "wire/channel.py": ["tests/wire/test_channel.py", "tests/wire/test_channel_rules.py",
                        "tests/wire/test_nonce_uniqueness.py"],
    "wire/framing.py": ["tests/wire/test_framing.py", "tests/wire/test_framing_rules.py"],
    "migration/resume.py": ["tests/migration/test_resume_handshake.py", "tests/migration/test_resume_rules.py"],
    "migration/receiver.py": ["tests/migration/test_postcopy.py"],
    "migration/destination.py": ["tests/migration/test_completeness.py", "tests/migration/test_postcopy.py"],
    "migration/source.py": ["tests/migration/test_completeness.py", "tests/migration/test_postcopy.py"],
    # issue 31: which enclave a client talks to, its sessions, and who may administer an agent
    "client/trust.py": ["tests/client/test_trust.py"],
    "client/session.py": ["tests/client/test_client_session.py"],
    "enclave/sessions.py": ["tests/enclave/test_sessions.py", "tests/wire/test_session.py"],
    "wire/session.py": ["tests/wire/test_session.py", "tests/enclave/test_sessions.py"],
    # issue 30: the rounds and the write trackers (frees count as writes; tracking lost fails safe)
    "migration/strategies/rounds.py": ["tests/migration/test_round_rules.py", "tests/migration/test_tracking_lost.py",
                                       "tests/migration/test_throttled_rounds.py"],
    "enclave/throttle.py": ["tests/enclave/test_throttle.py", "tests/migration/test_throttled_rounds.py"],
    "migration/strategies/converge.py": ["tests/migration/test_converge.py"],
    "migration/strategies/early.py": ["tests/migration/test_round_rules.py"],
    "enclave/dirty.py": ["tests/enclave/test_dirty.py"],
    "host/admin.py": ["tests/host/test_admin.py"],
    "host/pki.py": ["tests/host/test_admin.py"],
}

# Operators that multiply the mutant count without finding more (an `a + b` turned into `a ** b` or
# `a >> b` fails the same way as `a - b`): only the natural counterpart of each operator is kept.
KEEP_BINARY = {("Add", "Sub"), ("Sub", "Add"), ("Mul", "Div"), ("Mul", "Add"), ("Div", "Mul"),
               ("FloorDiv", "Div"), ("FloorDiv", "Mul"), ("Mod", "FloorDiv"), ("LShift", "RShift"),
               ("RShift", "LShift"), ("BitOr", "BitAnd"), ("BitAnd", "BitOr"), ("BitXor", "BitOr"),
               ("Pow", "Mul")}
KEEP_COMPARE = {("Lt", "LtE"), ("LtE", "Lt"), ("Gt", "GtE"), ("GtE", "Gt"), ("Lt", "Gt"), ("Gt", "Lt"),
                ("LtE", "GtE"), ("GtE", "LtE"), ("Eq", "NotEq"), ("NotEq", "Eq"), ("Is", "IsNot"),
                ("IsNot", "Is"), ("In", "NotIn"), ("NotIn", "In")}


def excluded_operators() -> list[str]:
    """Regexes for cosmic-ray's operators-filter: every pair operator not in the keep lists."""
    out = []
    for kind, keep in (("ReplaceBinaryOperator", KEEP_BINARY), ("ReplaceComparisonOperator", KEEP_COMPARE)):
        names = subprocess.run(["cosmic-ray", "operators"], capture_output=True, text=True, check=True).stdout
        for name in names.split():
            m = re.fullmatch(rf"core/{kind}_(\w+?)_(\w+)", name)
            if m and (m.group(1), m.group(2)) not in keep:
                out.append(re.escape(name) + "$")
    out.append(r"core/ReplaceUnaryOperator_.*")  # `not x` -> `~x` and the like: AddNot covers negation
    return out


# Hand-written bugs (issue 19's mutation run) that cosmic-ray's operators cannot produce:
# (module, [(text to find, replacement), ...], what it breaks). `--known` applies each and expects a test to fail.
KNOWN: list[tuple[str, list[tuple[str, str]], str]] = [
    ("wire/handshake.py", [("_h(_L_M2, self._m1, reply.eph_pub, reply.nonce)", "_h(_L_M2, self._m1, reply.nonce)"),
                           ("_h(_L_M2, self._m1, eph_pub, nonce)", "_h(_L_M2, self._m1, nonce)")],
     "M2's report data leaves out the destination's ephemeral key (on both sides)"),
    ("wire/handshake.py", [("elif p.signer not in self.allowed_signers:",
                            "elif own.signer not in self.allowed_signers:")],
     "the signer allow-list checks our own signer instead of the peer's"),
    ("migration/ledger.py", [("np.diff(expected) <= 0", "np.diff(expected) < 0")],
     "duplicate indices in the expected chunk list are accepted"),
    ("migration/protocol.py", [('"destination": frozenset({St.COMMITTED, St.RUNNING,',
                                '"destination": frozenset({St.RUNNING,')],
     "COMMITTED dropped from the destination's committed states (an ABORT could follow COMMIT)"),
    ("migration/protocol.py", [('St.HEAP_RECEIVED: {("send", "ready"): St.READY_SENT},',
                                'St.HEAP_RECEIVED: {("send", "ready"): St.READY_SENT, ("recv", "commit"): St.COMMITTED},')],
     "COMMIT accepted before READY (in HEAP_RECEIVED)"),
    ("migration/protocol.py", [('St.CONNECTED: {("recv", "state"): St.RECEIVING},',
                                'St.CONNECTED: {("recv", "state"): St.RECEIVING, ("recv", "commit"): St.COMMITTED},')],
     "COMMIT accepted before READY (in CONNECTED)"),
    ("migration/destination.py", [('== "stopcopy" and not ledger.complete', '== "stopcopy" and False')],
     "HEAP_END accepted with chunks missing as long as the count matches"),
    ("migration/destination.py", [('raise ProtocolError("post-copy sends no chunk before the handoff")', "pass")],
     "a post-copy destination takes a chunk before the handoff"),
    ("migration/source.py", [("done.count != ledger.expected.size or ", "")],
     "DONE accepted with chunks never delivered as long as the count matches"),
]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "*.egg-info")
    for part in ("src", "tests"):
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_command(tests: list[str], timeout: int) -> str:
    """pytest, stopping at the first failure; hypothesis with a fixed seed (the same examples for every
    mutant), or not loaded at all where no test uses it (its import is a good part of a run's start-up)."""
    uses_hypothesis = any("hypothesis" in (ROOT / t).read_text() for t in tests)
    plugin = "--hypothesis-seed=0" if uses_hypothesis else "-p no:hypothesispytest -p no:benchmark"
    return f"python -m pytest -x -q -p no:cacheprovider {plugin} -o addopts= --timeout={timeout} " + " ".join(tests)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy / "src")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def baseline(copy: Path, tests: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(test_command(tests, 600).split(), cwd=copy, env=env_for(copy), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tests fail without any mutant, fix them first:\n{proc.stdout[-3000:]}")
    return time.monotonic() - t0


def write_config(copy: Path, module: str, tests: list[str], timeout: float) -> Path:
    cfg = copy / "cosmic-ray.toml"
    excluded = ",\n    ".join(json.dumps(e) for e in excluded_operators())
    cfg.write_text(f"""[cosmic-ray]
module-path = "{PKG}/{module}"
timeout = {timeout:.0f}
excluded-modules = []
test-command = "{test_command(tests, int(timeout))}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = [
    {excluded}
]
""")
    return cfg


EQUIVALENT = "equivalent: only a function annotation changed (never evaluated under postponed annotations)"


def _strip_function_annotations(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
    return ast.dump(tree)


def mark_equivalent(db: Path, copy: Path) -> None:
    """Skip mutants that change nothing Python evaluates: with `from __future__ import annotations` a
    function's annotations stay strings (class-level ones are kept: msgspec and dataclasses read them)."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db), WorkDB.Mode.open) as wdb:
        for item in list(wdb.pending_work_items):
            mut = item.mutations[0]
            source = (copy / mut.module_path).read_text()
            if "from __future__ import annotations" not in source:
                continue
            try:
                mutated = mutate_code(source, get_operator(mut.operator_name)(**(mut.operator_args or {})),
                                      mut.occurrence)
                same = mutated is not None and (_strip_function_annotations(ast.parse(source))
                                                == _strip_function_annotations(ast.parse(mutated)))
            except Exception:  # noqa: BLE001 - a mutant that does not compile, or an operator's own bug:
                continue  # leave it to the test run, which reports it
            if same:
                wdb.set_result(item.job_id, WorkResult(output=EQUIVALENT, worker_outcome=WorkerOutcome.SKIPPED))


def results(db: Path) -> dict[str, Any]:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    out: dict[str, Any] = {"killed": 0, "survived": 0, "timeouts": 0, "incompetent": 0, "skipped": 0,
                           "equivalent": 0, "pending": 0, "survivors": []}
    with use_db(str(db), WorkDB.Mode.open) as wdb:
        done = set()
        for item, result in wdb.completed_work_items:
            done.add(item.job_id)
            if result.worker_outcome is WorkerOutcome.SKIPPED and result.output == EQUIVALENT:
                out["equivalent"] += 1
            elif result.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
                out["skipped"] += 1
            elif result.worker_outcome is not WorkerOutcome.NORMAL:
                out["incompetent"] += 1
            elif result.test_outcome is TestOutcome.SURVIVED:
                out["survived"] += 1
                mut = item.mutations[0]
                out["survivors"].append({"operator": mut.operator_name, "line": mut.start_pos[0],
                                         "where": mut.definition_name, "diff": "".join(result.diff)})
            elif result.test_outcome is TestOutcome.INCOMPETENT:
                out["incompetent"] += 1
            else:
                out["killed"] += 1
                out["timeouts"] += result.output == "timeout"
        out["pending"] = sum(1 for item in wdb.work_items if item.job_id not in done)
    out["survivors"].sort(key=lambda s: s["line"])
    tested = out["killed"] + out["survived"]
    out["score"] = round(100.0 * out["killed"] / tested, 1) if tested else None
    return out


def reopen_survivors(copy: Path, module: str, tests: list[str], log: Any) -> Path:
    """An earlier session of `module` in `copy`: take today's tests, and test its survivors again.

    Sound because tests are only ever added: a mutant killed before is still killed. Refused when the
    module's source changed since (its mutants would no longer be the ones in the session)."""
    db, cfg = copy / "session.sqlite", copy / "cosmic-ray.toml"
    if not db.exists() or not cfg.exists():
        raise SystemExit(f"--survivors-only: no earlier session of {module} in {copy}")
    if (copy / PKG / module).read_bytes() != (ROOT / PKG / module).read_bytes():
        raise SystemExit(f"--survivors-only: {module} changed since the session in {copy}; run it in full")
    shutil.rmtree(copy / "tests")
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    timeout = max(30.0, 3 * baseline(copy, tests) + 10)
    write_config(copy, module, tests, timeout)
    with sqlite3.connect(db) as con:
        n = con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
    log.write(f"{module}: {n} survivors to test again\n".encode())
    return cfg


def run_module(module: str, workdir: Path, log: Any, survivors_only: bool = False) -> dict[str, Any]:
    tests = MODULES[module]
    copy = workdir / module.replace("/", "_").removesuffix(".py")
    t0 = time.monotonic()
    db = copy / "session.sqlite"
    env = env_for(copy)
    if survivors_only:
        cfg = reopen_survivors(copy, module, tests, log)
    else:
        if copy.exists():
            shutil.rmtree(copy)
        copy_tree(copy)
        base = baseline(copy, tests)
        cfg = write_config(copy, module, tests, max(30.0, 3 * base + 10))
        for cmd in (["cosmic-ray", "init", str(cfg), str(db)], ["cr-filter-operators", str(db), str(cfg)],
                    ["cr-filter-pragma", str(db)]):
            subprocess.run(cmd, cwd=copy, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    mark_equivalent(db, copy)
    subprocess.run(["cosmic-ray", "exec", str(cfg), str(db)], cwd=copy, env=env, check=True, stdout=log,
                   stderr=subprocess.STDOUT)
    res = results(db)
    res.update(module=module, tests=tests, seconds=round(time.monotonic() - t0))
    return res


def count_mutants(module: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        cfg = write_config(copy, module, MODULES[module], 60)
        db = copy / "s.sqlite"
        for cmd in (["cosmic-ray", "init", str(cfg), str(db)], ["cr-filter-operators", str(db), str(cfg)],
                    ["cr-filter-pragma", str(db)]):
            subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
        mark_equivalent(db, copy)
        return results(db)["pending"]


def run_known(workdir: Path) -> int:
    """Apply each KNOWN mutant in a copy and run its module's tests: each must fail."""
    failures = 0
    for module, edits, what in KNOWN:
        copy = workdir / "known"
        if copy.exists():
            shutil.rmtree(copy)
        copy_tree(copy)
        path = copy / PKG / module
        text = path.read_text()
        if any(text.count(old) != 1 for old, _ in edits):
            print(f"n/a      {module}: {what} (the code changed; update KNOWN)")
            continue
        for old, new in edits:
            text = text.replace(old, new)
        path.write_text(text)
        cmd = test_command(MODULES[module], 300).split()
        proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True)
        verdict = "killed" if proc.returncode != 0 else "SURVIVED"
        failures += proc.returncode == 0
        print(f"{verdict:8} {module}: {what}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", choices=sorted(MODULES), help="repeatable; default: all")
    p.add_argument("--jobs", type=int, default=1, help="modules mutated at once (each in its own copy)")
    p.add_argument("--workdir", type=Path, help="keep the copies and sessions here (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--list", action="store_true", help="list modules, their tests and mutant counts")
    p.add_argument("--known", action="store_true", help="run only the hand-written mutants of KNOWN")
    p.add_argument("--survivors-only", action="store_true",
                   help="with --workdir of an earlier run: test only its survivors again, with today's tests")
    args = p.parse_args(argv)
    if shutil.which("cosmic-ray") is None:
        print('cosmic-ray is not installed: pip install ".[mutation]"', file=sys.stderr)
        return 2
    modules = args.module or list(MODULES)
    if args.survivors_only and not args.workdir:
        p.error("--survivors-only needs the --workdir of an earlier run")
    if args.list:
        for mod in modules:
            print(f"{mod:28} {count_mutants(mod):4} mutants  {' '.join(MODULES[mod])}")
        return 0
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="constmig-mutation-")
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.known:
            return 1 if run_known(workdir) else 0
        all_res = []
        with (open(workdir / "cosmic-ray.log", "ab") as log,
              concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool):
            futures = {pool.submit(run_module, mod, workdir, log, args.survivors_only): mod for mod in modules}
            for fut in concurrent.futures.as_completed(futures):
                res = fut.result()
                all_res.append(res)
                print(f"{res['module']:28} killed {res['killed']:4}  survived {res['survived']:3}  "
                      f"timeouts {res['timeouts']:3}  equivalent {res['equivalent']:3}  score {res['score']}%  "
                      f"({res['seconds']} s)", flush=True)
        print("\nSurviving mutants:")
        for res in sorted(all_res, key=lambda r: r["module"]):
            for s in res["survivors"]:
                print(f"\n--- {res['module']}:{s['line']} ({s['where']}, {s['operator']})\n{s['diff']}")
        if args.json:
            args.json.write_text(json.dumps(sorted(all_res, key=lambda r: r["module"]), indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
