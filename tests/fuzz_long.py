"""Long fuzz run of the parser properties in tests/wire/test_fuzz_parsers.py (not collected by pytest).

    python tests/fuzz_long.py --examples 200000              # every target
    python tests/fuzz_long.py --examples 50000 --only handshake --only Ticket
    python tests/fuzz_long.py --list

Each target runs its property with `--examples` generated inputs (targets that wait on timeouts get a small
share of that, see Target.long_share). A failure is shrunk by hypothesis and printed with its falsifying
example; the run goes on with the next target and exits 1 at the end. Crashes listed in KNOWN_CRASHES
(found, not fixed yet) are tolerated and counted, unless --strict.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "wire"))

import test_fuzz_parsers as fz  # noqa: E402  (the test module, found through the path set above)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=20_000, help="examples per target (default 20000)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only targets whose name contains TEXT (case-insensitive; repeatable)")
    p.add_argument("--seed", type=int, help="hypothesis seed, for a reproducible run")
    p.add_argument("--strict", action="store_true", help="fail on the known, not yet fixed crashes too")
    p.add_argument("--no-db", action="store_true", help="do not read or write the hypothesis example database")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)

    targets = [t for t in fz.TARGETS if not args.only or any(s.lower() in t.name.lower() for s in args.only)]
    if args.list or not targets:
        for t in fz.TARGETS:
            print(f"{t.name:38} {t.examples:6d} examples in pytest, share {t.long_share:g} here")
        return 0 if args.list else 2
    fz.STRICT = args.strict
    overrides = {"database": None} if args.no_db else {}

    failed: list[str] = []
    start = time.monotonic()
    for t in targets:
        n = max(10, int(args.examples * t.long_share))
        t0 = time.monotonic()
        print(f"{t.name:38} {n:8d} examples ...", end="", flush=True)
        try:
            fz.run_target(t, n, seed=args.seed, **overrides)
        except KeyboardInterrupt:
            print(" interrupted")
            return 130
        except BaseException:  # a property failed: print hypothesis' report, go on with the next target
            print(" FAILED")
            traceback.print_exc()
            failed.append(t.name)
            continue
        hits = fz.KNOWN_HITS.pop(t.name, 0)
        note = f"  ({hits} hits of a known crash)" if hits else ""
        print(f" ok in {time.monotonic() - t0:7.1f} s{note}")
    print(f"\n{len(targets) - len(failed)} of {len(targets)} targets passed in {time.monotonic() - start:.0f} s")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
