"""Tokenizing image corpora into Parquet token parts, on a pool of Ray actors; and stage `tokenize`.

    dvc repro tokenize          # the pipeline's shards -> data/tokens (python -m pipelines.tokenize)
    vqpipe tokenize --tokenizer models/tokenizer --input 's3://b/{00000..09999}.tar' --output s3://b/tokens/

Both go through `tokenize_corpus`: one unit of work per input shard, done by actors that load
the tokenizer once (its files travel through Ray's object store, so workers need no shared
disk), decode images on threads while the model encodes, and write one part per shard (see
`components.data.tokenization`). Complete parts of the same tokenizer are kept on a rerun;
a shard that cannot be read is retried, then reported as failed while the rest completes.
`_manifest.json` lists every part with its counts, and every failed shard.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from components.config import TokenizeConfig
from components.data import shards as shard_io
from components.data import tokens as token_io
from components.data.corpus import ShardUnreadable
from components.data.tokenization import ShardTokens, part_names, tokenize_shard
from components.tokenizers import Tokenizer
from components.tokenizers.tokenizer import CONFIG_FILE, WEIGHTS_FILE
from pipelines.distributed import init_ray
from pipelines.runtime import Paths, resolve_device, stage_main
from pipelines.tracking import fetch_export, stage_run

log = logging.getLogger("vqpipe.tokenize")

SHARDS_AT_ONCE = 2  # per worker


def resolve_tokenizer(spec: str, dest: str | Path) -> Path:
    """The local directory of the tokenizer `spec` names: an export directory as it is, or an
    MLflow model or artifact URI (`models:/name@alias`, `models:/name/3`, `runs:/id/tokenizer`)
    downloaded into `dest` (see `pipelines.tracking.fetch_export`)."""
    return fetch_export(spec, dest, "tokenizer")


def load_tokenizer_files(files: dict[str, bytes], device="cpu") -> Tokenizer:
    """A tokenizer from its export's files (as shipped to workers through Ray's object store)."""
    with tempfile.TemporaryDirectory(prefix="vqpipe-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return Tokenizer.load(tmp, device=device)


class ShardWorker:
    """Holds one loaded tokenizer and tokenizes whole shards: a Ray actor, or a plain object
    when the job runs in this process. Two shards at once (`SHARDS_AT_ONCE`, threads), one
    forward pass at a time: one shard is read, decoded and written while the other computes."""

    def __init__(self, files: dict[str, bytes], device: str, threads: int, decode_threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.tokenizer = load_tokenizer_files(files, resolve_device(device))
        self.decode_threads = decode_threads
        self.model_lock = threading.Lock()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def tokenize(self, url: str, out: str, part: str, name: str, batch_size: int) -> tuple[ShardTokens, str]:
        """The shard's result and the node that did it."""
        result = tokenize_shard(
            self.tokenizer,
            url,
            out,
            part,
            input_name=name,
            batch_size=batch_size,
            decode_threads=self.decode_threads,
            model_lock=self.model_lock,
        )
        return result, self.node()


@dataclass
class CorpusJob:
    inputs: list[str]  # shard URLs (see components.data.corpus.expand_inputs)
    output: str  # directory: a local path or any fsspec URL
    tokenizer: str  # export directory or MLflow URI
    batch_size: int = 256
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (GPUs) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "auto"
    decode_threads: int | None = None  # per worker; None: one per CPU of the worker
    retries: int = 2  # further attempts at a shard that failed
    retry_delay: float = 1.0  # seconds before a retry, times the attempt
    overwrite: bool = False
    in_process: bool = False  # no Ray: one worker in this process
    ray_address: str | None = None
    names: dict[str, str] | None = None  # input URL -> the name recorded for it (default: the URL)

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("no input shards")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


@dataclass
class CorpusResult:
    manifest: dict
    tokenized: int  # parts written by this run
    skipped: int  # complete parts of the same tokenizer, kept
    failed: list[dict]  # {"input_shard", "part", "error", "attempts"}
    images: int  # rows written by this run
    seconds: float  # wall time of the tokenizing, from the workers ready to the last part written
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> shards it tokenized

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Work:
    url: str
    name: str
    part: str
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


def _filesystem(output: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def _existing_parts(fs, root: str, listing: set[str], names: list[str]) -> dict[str, token_io.PartInfo | None]:
    """Part name -> info (None: unreadable) for the parts of `names` already in the output
    (`listing`); removes leftover temporaries."""
    for leftover in sorted(n for n in listing if n.startswith(".part-") and n.endswith(".tmp")):
        fs.rm(f"{root}/{leftover}")  # from a killed run: never taken for a part
    present = [n for n in names if n in listing]

    def info(name: str):
        try:
            return name, token_io.part_info(f"{root}/{name}", filesystem=fs)
        except Exception as err:  # not a readable vqpipe part: redo it
            log.warning("existing %s is not a readable token part (%s): redoing it", name, err)
            return name, None

    with ThreadPoolExecutor(16) as pool:  # footers only; in parallel for object stores
        return dict(pool.map(info, present))


def _listing(fs, root: str) -> list[str]:
    """File names in the output directory (none when it does not exist yet)."""
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


@dataclass
class CorpusPlan:
    tokenizer: Tokenizer
    files: dict[str, bytes]  # the tokenizer's export, shipped to the workers
    done: dict[str, ShardTokens]  # input URL -> its complete part, kept
    todo: list[_Work]


def plan_corpus(job: CorpusJob) -> CorpusPlan:
    """Load the tokenizer and sort the inputs into complete parts (same tokenizer, same input:
    kept unless `overwrite`) and work to do. Reads only the existing parts' footers."""
    job.check()
    names = {url: (job.names or {}).get(url, url) for url in job.inputs}
    parts = part_names([names[url] for url in job.inputs])
    with tempfile.TemporaryDirectory(prefix="vqpipe-tokenizer-") as tmp:
        tokenizer_dir = resolve_tokenizer(job.tokenizer, tmp)
        files = {name: (tokenizer_dir / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    tokenizer = load_tokenizer_files(files)

    fs, root = _filesystem(job.output)
    fs.makedirs(root, exist_ok=True)
    listing = set(_listing(fs, root))  # one listing: on object stores every one is a request
    existing = _existing_parts(fs, root, listing, list(parts.values()))
    done: dict[str, ShardTokens] = {}
    todo: list[_Work] = []
    other_tokenizer = 0
    for url in job.inputs:
        name, part = names[url], parts[names[url]]
        if part in existing:
            info = existing[part]
            same = info is not None and info.fingerprint == tokenizer.fingerprint
            if same and not job.overwrite and info.source and info.source.get("input_shard") == name:
                src = info.source
                done[url] = ShardTokens(name, part, src["samples"], info.rows, src["rejects"])
                continue
            if not same:
                # Another tokenizer's part (or an unreadable file) goes now, not when its shard
                # is redone: if that fails, no part of the old tokenizer stays among the new.
                other_tokenizer += 1
                fs.rm(f"{root}/{part}")
        todo.append(_Work(url, name, part))
    if todo and token_io.MANIFEST in listing:
        fs.rm(f"{root}/{token_io.MANIFEST}")  # a manifest is there only while the output is finished
    log.info(
        "%d input shards: %d parts complete, %d to tokenize%s",
        len(job.inputs),
        len(done),
        len(todo),
        f" ({other_tokenizer} made by another tokenizer, removed, are redone)" if other_tokenizer else "",
    )
    ours = set(parts.values())
    stale = sorted(n for n in listing if n.startswith("part-") and n.endswith(".parquet") and n not in ours)
    if stale:
        log.warning(
            "%d parts in %s belong to no input of this job (e.g. %s); they are not in the manifest",
            len(stale),
            job.output,
            stale[0],
        )
    return CorpusPlan(tokenizer, files, done, todo)


def tokenize_corpus(
    job: CorpusJob,
    progress: Callable[[ShardTokens | None, dict | None], None] | None = None,
    plan: CorpusPlan | None = None,
    annotate: Callable[[dict], None] | None = None,
) -> CorpusResult:
    """Tokenize `job.inputs` into `job.output`; see the module doc. `progress` is called once per
    shard tokenized this run (with its result, or with its failure entry); `annotate` may add
    to the manifest before it is written."""
    plan = plan or plan_corpus(job)
    tokenizer, files, done, todo = plan.tokenizer, plan.files, dict(plan.done), plan.todo
    out = job.output if "://" in job.output else str(Path(job.output).resolve())
    failed: list[dict] = []
    nodes: dict[str, int] = {}

    def finished(work: _Work, outcome: tuple[ShardTokens, str] | None) -> None:
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
        runner = _run_in_process if job.in_process else _run_on_ray
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
        "image_size": tokenizer.image_size,
        "grid": {name: list(grid) for name, grid in tokenizer.column_grids.items()},
        "levels": [tokenizer.level_columns(level) for level in tokenizer.levels],
        "inputs": inputs,
        "complete": not failed and len(parts) == inputs,
        "samples": sum(p["samples"] for p in parts),
        "rows": sum(p["rows"] for p in parts),
        "rejected": sum(p["rejected"] for p in parts),
        "parts": parts,
        "failed": sorted(failed, key=lambda f: f["part"]),
    }


def _describe(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # a Ray task error carries the worker's exception
    err = cause if isinstance(cause, BaseException) else err
    if isinstance(err, ShardUnreadable):
        return err.reason
    return f"{type(err).__name__}: {err}"


def _run_in_process(job: CorpusJob, files: dict, todo: list[_Work], out: str, finished) -> float:
    """Tokenize `todo` here, two shards at a time on threads; returns when the work began."""
    import torch

    threads = max(1, int(job.cpus_per_worker))
    previous_threads = torch.get_num_threads()  # the worker sets its own; this process gets its own back
    worker = ShardWorker(files, job.device, threads, job.decode_threads or threads)
    began = time.perf_counter()
    lock = threading.Lock()  # `finished` runs for one shard at a time

    def attempt(work: _Work) -> None:
        while True:
            work.attempts += 1
            try:
                outcome = worker.tokenize(work.url, out, work.part, work.name, job.batch_size)
            except Exception as err:  # noqa: BLE001 - any failure of a shard is retried, then reported
                work.errors.append(_describe(err))
                if work.attempts <= job.retries:
                    log.warning("attempt %d at %s failed (%s); retrying", work.attempts, work.name, work.errors[-1])
                    time.sleep(job.retry_delay * work.attempts)
                    continue
                outcome = None
            with lock:
                finished(work, outcome)
            return

    try:
        with ThreadPoolExecutor(SHARDS_AT_ONCE, thread_name_prefix="shard") as pool:
            for future in [pool.submit(attempt, work) for work in todo]:
                future.result()
    finally:
        torch.set_num_threads(previous_threads)
    return began


def _run_on_ray(job: CorpusJob, files: dict, todo: list[_Work], out: str, finished) -> float:
    """Tokenize `todo` on a pool of Ray actors, at most two shards queued per actor; returns
    when the actors were ready."""
    ray = init_ray(address=job.ray_address)
    resources = ray.cluster_resources()
    if job.gpus_per_worker > 0:
        if resources.get("GPU", 0) < job.gpus_per_worker:
            raise ValueError(
                f"gpus_per_worker={job.gpus_per_worker}, but the Ray cluster has {resources.get('GPU', 0):g} GPUs"
            )
        fit = int(resources["GPU"] / job.gpus_per_worker)
    else:
        fit = int(resources.get("CPU", 1) / job.cpus_per_worker)
    count = max(1, min(job.workers or fit, len(todo)))
    threads = max(1, int(job.cpus_per_worker))
    # A worker with no GPU reserved stays on the CPU under `auto`: otherwise every worker on a
    # GPU machine would pile onto a device Ray never gave it.
    device = job.device if job.gpus_per_worker > 0 or job.device != "auto" else "cpu"
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=job.cpus_per_worker,
        num_gpus=job.gpus_per_worker,
        max_restarts=3,
        scheduling_strategy="SPREAD",
        max_concurrency=SHARDS_AT_ONCE,
    )
    files_ref = ray.put(files)
    actors = [actor_cls.remote(files_ref, device, threads, job.decode_threads or threads) for _ in range(count)]
    ray.get([a.node.remote() for a in actors])  # started, tokenizer loaded
    began = time.perf_counter()
    log.info(
        "tokenizing %d shards on %d Ray workers (%g CPU, %g GPU each)",
        len(todo),
        count,
        job.cpus_per_worker,
        job.gpus_per_worker,
    )

    queue = list(reversed(todo))  # popped from the end: input order
    inflight: dict = {}  # object ref -> (actor index, work)
    load = [0] * count
    per_actor = SHARDS_AT_ONCE  # bounded memory: never more shards in flight than a worker runs
    try:
        while queue or inflight:
            for i in range(count):
                while queue and load[i] < per_actor:
                    work = queue.pop()
                    work.attempts += 1
                    ref = actors[i].tokenize.remote(work.url, out, work.part, work.name, job.batch_size)
                    inflight[ref] = (i, work)
                    load[i] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                i, work = inflight.pop(ref)
                load[i] -= 1
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a task error, or the actor died (Ray restarts it)
                    work.errors.append(_describe(err))
                    if work.attempts <= job.retries:
                        log.warning("attempt %d at %s failed (%s); retrying", work.attempts, work.name, work.errors[-1])
                        queue.insert(0, work)  # behind the rest: time for a transient fault to pass
                        continue
                    finished(work, None)
                    continue
                finished(work, outcome)
    finally:
        for actor in actors:
            ray.kill(actor)
    return began


# -- the pipeline's stage ------------------------------------------------------------------------


@dataclass
class TokenizeResult:
    out_dir: Path
    manifest: dict


def run(cfg: TokenizeConfig, paths: Paths = Paths()) -> TokenizeResult:
    with stage_run("tokenize", cfg) as active:
        import mlflow

        shard_manifest = shard_io.read_manifest(paths.shards)
        # Absolute paths to read (Ray workers do not share this process's working directory),
        # project-relative names to record: the manifest stays valid when the project moves.
        shard_dir = paths.shards.resolve()
        entries = [(s["split"], str(shard_dir / s["name"])) for s in shard_manifest["shards"]]
        names = {url: _portable(url, paths.root) for _, url in entries}
        out_dir = paths.tokens
        if out_dir.exists():
            shutil.rmtree(out_dir)
        job = CorpusJob(
            inputs=[url for _, url in entries],
            output=str(out_dir),
            tokenizer=str(paths.tokenizer),
            batch_size=cfg.batch_size,
            workers=cfg.num_actors,
            cpus_per_worker=cfg.num_cpus_per_actor,
            gpus_per_worker=cfg.num_gpus_per_actor,
            device=cfg.device,
            overwrite=True,
            names=names,
        )
        split_of = {names[url]: split for split, url in entries}

        def annotate(manifest: dict) -> None:  # what the pipeline's stages read besides the parts
            for part in manifest["parts"]:
                part["split"] = split_of[part["input_shard"]]
            manifest["classes"] = shard_manifest.get("classes")
            manifest["splits"] = {
                split: {"rows": sum(p["rows"] for p in manifest["parts"] if p["split"] == split)}
                for split in ("train", "val")
            }

        result = tokenize_corpus(job, annotate=annotate)
        if result.failed:
            raise RuntimeError(
                "shards could not be read: " + "; ".join(f"{f['input_shard']}: {f['error']}" for f in result.failed)
            )
        manifest = result.manifest
        mlflow.log_metrics(
            {
                "train_rows": manifest["splits"]["train"]["rows"],
                "val_rows": manifest["splits"]["val"]["rows"],
                "rejected": manifest["rejected"],
                "parts": len(manifest["parts"]),
                "images_per_second": result.images_per_second,
            }
        )
        mlflow.set_tag("vqpipe.tokenizer_fingerprint", manifest["tokenizer_fingerprint"])
        log.info(
            "wrote %d parts (%d rows) to %s (run %s)",
            len(manifest["parts"]),
            manifest["rows"],
            out_dir,
            active.info.run_id,
        )
        return TokenizeResult(out_dir, manifest)


def _portable(path: str, root: Path) -> str:
    """A shard path relative to the project when it lies inside it: manifests stay valid when
    the project moves (and DVC sees the same output wherever it was made)."""
    try:
        return Path(path).relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def main() -> None:
    stage_main("tokenize", run)


if __name__ == "__main__":
    main()
