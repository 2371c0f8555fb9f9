"""The readers against seeded corruptions of tars, images and Parquet files (tests/fuzzing.py):
no crash, no hang, exact accounting. `VQPIPE_FUZZ_CASES` sets how many (default 600);
benchmarks/fuzz_readers.py runs thousands and prints what they found."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter

from tests.fuzzing import cases, check

CASES = int(os.environ.get("VQPIPE_FUZZ_CASES", "600"))
CASE_TIMEOUT = 20.0  # seconds; a case over it is a hang


def test_readers_survive_seeded_corruptions(tmp_path):
    outcomes: Counter = Counter()
    failures: list[str] = []
    for n, case in enumerate(cases(CASES, seed=0)):
        box: dict = {}

        def run(case=case, workdir=tmp_path / str(n), box=box):
            try:
                box["outcome"] = check(case, workdir)
            except BaseException as err:  # noqa: BLE001 - every failure is listed below
                box["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(CASE_TIMEOUT)
        if thread.is_alive():
            failures.append(f"{case.name}: still running after {CASE_TIMEOUT:g} s")
            continue
        if "error" in box:
            failures.append(f"{case.name}: {box['error'][:300]}")
            continue
        outcomes[box["outcome"]] += 1
        shutil.rmtree(tmp_path / str(n), ignore_errors=True)
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:30])
    assert sum(outcomes.values()) == CASES
    # The corruptions reach every outcome: unreadable shards, rejected samples, intact reads.
    assert outcomes["unreadable"] and outcomes["read, some rejected"] and outcomes["read whole"], outcomes
