"""The corpus tokenization flow behind `vqpipe tokenize`.

    vqpipe tokenize --tokenizer models/tokenizer --input 's3://bucket/laion/{00000..09999}.tar' \\
        --output s3://bucket/laion-tokens/ --ray-address auto --gpus-per-actor 1

A Prefect flow of two tasks, listing the input shards and tokenizing them (`pipelines.corpus.
tokenize_corpus`, on Ray). Progress goes to the flow run's log and to a progress artifact in the
Prefect UI (and to a bar on a terminal); the summary is a markdown artifact. Shards that fail
every attempt leave the rest of the job to complete, then fail the flow run with
`ShardsFailed`, which names them.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from tqdm import tqdm

from components.data.corpus import expand_inputs
from components.data.limits import ReadLimits
from components.data.tokens import MANIFEST
from pipelines.corpus import CorpusJob, CorpusResult, plan_corpus, tokenize_corpus
from pipelines.corpus.job import TOKENIZE
from pipelines.corpus.planning import output_lock


class ShardsFailed(RuntimeError):
    """Some input shards could not be read; everything else was tokenized."""

    def __init__(self, summary: dict):
        failed = summary["failed"]
        listed = "\n".join(f"  {f['input_shard']}: {f['error']}" for f in failed[:50])
        more = f"\n  ... and {len(failed) - 50} more (see {summary['manifest']})" if len(failed) > 50 else ""
        super().__init__(f"{len(failed)} of {summary['inputs']} input shards failed after retries:\n{listed}{more}")
        self.summary = summary


@task(name="list-input-shards", cache_policy=NONE)
def list_inputs(specs: list[str], allow_pipe_in_lists: bool = False) -> list[str]:
    urls = expand_inputs(specs, allow_pipe_in_lists)
    if not urls:
        raise ValueError(f"no input shards in {specs}")
    get_run_logger().info("%d input shards (first %s)", len(urls), urls[0])
    return urls


class _Progress:
    """Per-shard progress: a log line every `every` seconds, the Prefect progress artifact, a
    terminal bar when asked."""

    def __init__(self, total: int, bar: bool, every: float = 15.0):
        self.total, self.every = total, every
        self.shards = self.images = self.failed = 0
        self.start = self.last = time.monotonic()
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(0.0, key="tokenize-progress", description="input shards tokenized")
        self.bar = None
        if bar:
            self.bar = tqdm(total=total, unit="shard", dynamic_ncols=True)

    def __call__(self, result, failure) -> None:
        self.shards += 1
        if result is not None:
            self.images += result.rows
        else:
            self.failed += 1
        rate = self.images / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(images=self.images, img_s=f"{rate:.0f}", failed=self.failed)
        now = time.monotonic()
        if now - self.last >= self.every or self.shards == self.total:
            self.last = now
            self.logger.info(
                "%d/%d shards, %d images, %.0f images/s, %d failed",
                self.shards,
                self.total,
                self.images,
                rate,
                self.failed,
            )
            update_progress_artifact(self.artifact, 100.0 * self.shards / self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@task(name="tokenize-shards", cache_policy=NONE)
def tokenize_shards(job: CorpusJob, bar: bool) -> CorpusResult:
    with output_lock(job.output):
        plan = plan_corpus(job)
        progress = _Progress(len(plan.todo), bar)
        try:
            return tokenize_corpus(job, progress=progress, plan=plan)
        finally:
            progress.close()


def summarize(job: CorpusJob, result: CorpusResult) -> dict:
    m = result.manifest
    return {
        "output": job.output,
        "manifest": f"{job.output.rstrip('/')}/{MANIFEST}",
        "tokenizer_fingerprint": m["tokenizer_fingerprint"],
        "inputs": m["inputs"],
        "tokenized": result.tokenized,
        "skipped": result.skipped,
        "failed": result.failed,
        "samples": m["samples"],
        "rows": m["rows"],
        "rejected": m["rejected"],
        "images_this_run": result.images,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "ray_nodes": 0 if job.in_process else len(result.nodes),
    }


@flow(name="vqpipe-tokenize", log_prints=True)
def tokenize_flow(
    tokenizer: str,
    inputs: list[str],
    output: str,
    batch_size: int = TOKENIZE.batch_size,
    actors: int | None = None,
    cpus_per_actor: float = TOKENIZE.cpus_per_actor,
    gpus_per_actor: float = TOKENIZE.gpus_per_actor,
    device: str = TOKENIZE.device,
    decode_threads: int | None = None,
    retries: int = 2,
    overwrite: bool = False,
    in_process: bool = False,
    ray_address: str | None = None,
    progress_bar: bool = False,
    limits: dict | None = None,
) -> dict:
    """Tokenize the shards `inputs` names (patterns, globs, @files, URLs) into `output`; returns
    the summary (see `summarize`). Raises ShardsFailed, after writing everything else and the
    manifest, when some shards failed every attempt. `limits`: the fields of
    `components.data.limits.ReadLimits` to change (pixels, bytes, timeouts, `pipe:` in lists)."""
    read_limits = ReadLimits(**(limits or {}))
    urls = list_inputs(inputs, read_limits.allow_pipe_in_lists)
    job = CorpusJob(
        inputs=urls,
        output=output,
        tokenizer=tokenizer,
        batch_size=batch_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        device=device,
        decode_threads=decode_threads,
        retries=retries,
        overwrite=overwrite,
        in_process=in_process,
        ray_address=ray_address,
        limits=read_limits,
    )
    result = tokenize_shards(job, progress_bar)
    summary = summarize(job, result)
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if k != "failed")
    failed = "".join(f"\n- `{f['input_shard']}`: {f['error']}" for f in result.failed[:100])
    create_markdown_artifact(
        f"| | |\n|---|---|\n{rows}\n| failed | {len(result.failed)} |\n"
        + (f"\n**Failed shards**{failed}\n" if failed else ""),
        key="tokenize-summary",
        description="vqpipe tokenize",
    )
    if result.failed:
        raise ShardsFailed(summary)
    return summary
