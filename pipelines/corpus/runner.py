"""`tokenize_corpus`: plan, tokenize what is left on the actor pool, write the manifest.

The manifest holds nothing that depends on where or how the job ran, so the same inputs give
the same manifest; it is present only while the output is finished (a run with work to do
removes it first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from components.data import tokens as token_io
from components.data.tokenization import ShardTokens
from components.tokenizers import Tokenizer
from pipelines.corpus.job import CorpusJob, CorpusResult, ShardWork
from pipelines.corpus.planning import CorpusPlan, output_lock, plan_corpus
from pipelines.corpus.pool import run_in_process, run_on_ray

log = logging.getLogger("vqpipe.tokenize")


def tokenize_corpus(
    job: CorpusJob,
    progress: Callable[[ShardTokens | None, dict | None], None] | None = None,
    plan: CorpusPlan | None = None,
    annotate: Callable[[dict], None] | None = None,
) -> CorpusResult:
    """Tokenize `job.inputs` into `job.output`; see the module doc. `progress` is called once per
    shard tokenized this run (with its result, or with its failure entry); `annotate` may add
    to the manifest before it is written. With a `plan` made beforehand, the caller holds
    `output_lock(job.output)` over both."""
    if plan is None:
        with output_lock(job.output):
            return tokenize_corpus(job, progress, plan_corpus(job), annotate)
    tokenizer, files, done, todo = plan.tokenizer, plan.files, dict(plan.done), plan.todo
    out = job.output if "://" in job.output else str(Path(job.output).resolve())
    failed: list[dict] = []
    nodes: dict[str, int] = {}

    def finished(work: ShardWork, outcome: tuple[ShardTokens, str] | None) -> None:
        if outcome is None:
            entry = {"input_shard": work.name, "part": work.part, "attempts": work.attempts, "error": work.errors[-1]}
            failed.append(entry)
            log.error("failed after %d attempts: %s: %s", work.attempts, work.name, work.errors[-1])
            if progress:
                progress(None, entry)
            return
        result, node = outcome
        done[work.url] = result
        nodes[node] = nodes.get(node, 0) + 1
        if progress:
            progress(result, None)

    seconds = 0.0
    if todo:
        runner = run_in_process if job.in_process else run_on_ray
        began = runner(job, files, todo, out, finished)
        seconds = time.perf_counter() - began

    manifest = corpus_manifest(tokenizer, [done[url] for url in job.inputs if url in done], failed, len(job.inputs))
    if annotate:
        annotate(manifest)
    token_io.write_manifest(job.output, manifest)
    made = [done[w.url] for w in todo if w.url in done]
    return CorpusResult(
        manifest=manifest,
        tokenized=len(made),
        skipped=len(job.inputs) - len(todo),
        failed=failed,
        images=sum(r.rows for r in made),
        seconds=seconds,
        nodes=nodes,
    )


def corpus_manifest(tokenizer: Tokenizer, results: list[ShardTokens], failed: list[dict], inputs: int) -> dict:
    """`_manifest.json`: the same for the same inputs and tokenizer, however the work was spread
    or interrupted (no times, no hosts). Counts add up: per part and in total, rows + rejected =
    samples read."""
    parts = [r.manifest_entry() for r in sorted(results, key=lambda r: r.part)]
    return {
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "codebook_size": tokenizer.codebook_size,
        "codebook_sizes": tokenizer.column_codebook_sizes,
        "image_size": tokenizer.image_size,
        "grid": {name: list(grid) for name, grid in tokenizer.column_grids.items()},
        "tiers": [tokenizer.tier_columns(tier) for tier in tokenizer.tiers],
        "inputs": inputs,
        "complete": not failed and len(parts) == inputs,
        "samples": sum(p["samples"] for p in parts),
        "rows": sum(p["rows"] for p in parts),
        "rejected": sum(p["rejected"] for p in parts),
        "parts": parts,
        "failed": sorted(failed, key=lambda f: f["part"]),
    }
