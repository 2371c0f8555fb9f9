"""The readers against many seeded corruptions (tests/fuzzing.py): prints how many cases ran,
what became of them, how long they took, and every case that crashed, hung or lost count.

    .venv/bin/python benchmarks/fuzz_readers.py [--cases 5000] [--seed 0] [--timeout 20]

The test (tests/components/test_fuzz_readers.py) runs 600 of the same cases in CI.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzzing import cases, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take before it is a hang")
    args = parser.parse_args()
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    failures: list[str] = []
    seconds: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="vqpipe-fuzz-"))
    started = time.perf_counter()
    try:
        for n, case in enumerate(cases(args.cases, args.seed)):
            box: dict = {}

            def run(case=case, workdir=work / str(n), box=box) -> None:
                try:
                    box["outcome"] = check(case, workdir)
                except BaseException as err:  # noqa: BLE001 - every failure is listed
                    box["error"] = f"{type(err).__name__}: {err}"

            t0 = time.perf_counter()
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            thread.join(args.timeout)
            seconds.append(time.perf_counter() - t0)
            kinds[case.name.split(": ", 1)[1].split(" (")[0].split(" 0x")[0][:28]] += 1
            if thread.is_alive():
                failures.append(f"{case.name}: still running after {args.timeout:g} s")
            elif "error" in box:
                failures.append(f"{case.name}: {box['error'][:300]}")
            else:
                outcomes[box["outcome"]] += 1
            shutil.rmtree(work / str(n), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    print(
        f"{args.cases} cases (seed {args.seed}) in {total:.1f} s; median {1000 * statistics.median(seconds):.1f} ms, "
        f"max {max(seconds):.2f} s per case\n"
    )
    print("| outcome | cases |\n|---|---|")
    for outcome, count in outcomes.most_common():
        print(f"| {outcome} | {count} |")
    print(f"| **crashed, hung or lost count** | **{len(failures)}** |\n")
    print("| corruption | cases |\n|---|---|")
    for kind, count in sorted(kinds.items()):
        print(f"| {kind} | {count} |")
    for failure in failures[:100]:
        print(f"FAILED {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
