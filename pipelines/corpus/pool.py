"""Who tokenizes the shards: a pool of Ray actors (`run_on_ray`), or one actor's work in this
process (`run_in_process`). Each actor loads the tokenizer once (its files travel through Ray's
object store, so actors need no shared disk) and holds two shards at once, one forward pass at
a time, so one shard is read, decoded and written while the other computes. A shard that fails
is retried behind the rest of the queue, then reported as failed while the rest completes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from components.data.corpus import ShardUnreadable
from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.data.tokenization import ShardTask, ShardTokens, tokenize_shard
from pipelines.corpus.job import CorpusJob, ShardWork
from pipelines.corpus.planning import load_tokenizer_files
from pipelines.distributed import init_ray
from pipelines.runtime import resolve_device

log = logging.getLogger("vqpipe.tokenize")

SHARDS_AT_ONCE = 2  # per actor


class ShardActor:
    """Holds one loaded tokenizer and tokenizes whole shards: a Ray actor, or a plain object
    when the job runs in this process. Two shards at once (`SHARDS_AT_ONCE`, threads), one
    forward pass at a time: one shard is read, decoded and written while the other computes."""

    def __init__(self, files: dict[str, bytes], device: str, threads: int, decode_threads: int):
        torch.set_num_threads(max(1, threads))
        self.tokenizer = load_tokenizer_files(files, resolve_device(device))
        self.decode_threads = decode_threads
        self.model_lock = threading.Lock()

    def node(self) -> str:
        import ray  # an actor's method: Ray is already imported where it runs

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def tokenize(
        self, url: str, out: str, part: str, name: str, batch_size: int, limits: ReadLimits = DEFAULT_LIMITS
    ) -> tuple[ShardTokens, str]:
        """The shard's result and the node that did it."""
        task = ShardTask(url, out, part, input_name=name, limits=limits)
        result = tokenize_shard(self.tokenizer, task, batch_size, self.decode_threads, self.model_lock)
        return result, self.node()


def _describe(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # a Ray task error carries the worker's exception
    err = cause if isinstance(cause, BaseException) else err
    if isinstance(err, ShardUnreadable):
        return err.reason
    return f"{type(err).__name__}: {err}"


def run_in_process(job: CorpusJob, files: dict, todo: list[ShardWork], out: str, finished) -> float:
    """Tokenize `todo` here, two shards at a time on threads; returns when the work began."""
    threads = max(1, int(job.cpus_per_actor))
    previous_threads = torch.get_num_threads()  # the actor sets its own; this process gets its own back
    worker = ShardActor(files, job.device, threads, job.decode_threads or threads)
    began = time.perf_counter()
    lock = threading.Lock()  # `finished` runs for one shard at a time

    def attempt(work: ShardWork) -> None:
        while True:
            work.attempts += 1
            try:
                outcome = worker.tokenize(work.url, out, work.part, work.name, job.batch_size, job.limits)
            except Exception as err:  # noqa: BLE001 - any failure of a shard is retried, then reported
                if _retry(job, work, err):
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


def run_on_ray(job: CorpusJob, files: dict, todo: list[ShardWork], out: str, finished) -> float:
    """Tokenize `todo` on a pool of Ray actors, at most SHARDS_AT_ONCE shards queued per actor
    (memory stays bounded whatever the corpus); returns when the actors were ready."""
    ray = init_ray(address=job.ray_address)
    actors = _start_actors(ray, job, files, len(todo))
    began = time.perf_counter()
    log.info(
        "tokenizing %d shards on %d Ray actors (%g CPU, %g GPU each)",
        *(len(todo), len(actors), job.cpus_per_actor, job.gpus_per_actor),
    )
    queue = list(reversed(todo))  # popped from the end: input order
    inflight: dict = {}  # object ref -> (actor index, work)
    load = [0] * len(actors)
    try:
        while queue or inflight:
            for i, actor in enumerate(actors):
                while queue and load[i] < SHARDS_AT_ONCE:
                    work = queue.pop()
                    work.attempts += 1
                    ref = actor.tokenize.remote(work.url, out, work.part, work.name, job.batch_size, job.limits)
                    inflight[ref] = (i, work)
                    load[i] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                i, work = inflight.pop(ref)
                load[i] -= 1
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a task error, or the actor died (Ray restarts it)
                    if _retry(job, work, err):
                        queue.insert(0, work)  # behind the rest: time for a transient fault to pass
                        continue
                    outcome = None
                finished(work, outcome)
    finally:
        for actor in actors:
            ray.kill(actor)
    return began


def _start_actors(ray, job: CorpusJob, files: dict, shards: int) -> list:
    """As many actors as the job asks for, else as the cluster's CPUs (GPUs) allow, never more
    than there are shards; started, with the tokenizer loaded."""
    resources = ray.cluster_resources()
    if job.gpus_per_actor > 0:
        if resources.get("GPU", 0) < job.gpus_per_actor:
            gpus = resources.get("GPU", 0)
            raise ValueError(f"gpus_per_actor={job.gpus_per_actor}, but the Ray cluster has {gpus:g} GPUs")
        fit = int(resources["GPU"] / job.gpus_per_actor)
    else:
        fit = int(resources.get("CPU", 1) / job.cpus_per_actor)
    count = max(1, min(job.actors or fit, shards))
    threads = max(1, int(job.cpus_per_actor))
    # An actor with no GPU reserved stays on the CPU under `auto`: otherwise every actor on a
    # GPU machine would pile onto a device Ray never gave it.
    device = job.device if job.gpus_per_actor > 0 or job.device != "auto" else "cpu"
    actor_cls = ray.remote(ShardActor).options(
        num_cpus=job.cpus_per_actor,
        num_gpus=job.gpus_per_actor,
        max_restarts=3,
        scheduling_strategy="SPREAD",
        max_concurrency=SHARDS_AT_ONCE,
    )
    files_ref = ray.put(files)
    actors = [actor_cls.remote(files_ref, device, threads, job.decode_threads or threads) for _ in range(count)]
    ray.get([a.node.remote() for a in actors])
    return actors


def _retry(job: CorpusJob, work: ShardWork, err: BaseException) -> bool:
    """Record a failed attempt; whether the shard gets another."""
    work.errors.append(_describe(err))
    if work.attempts <= job.retries:
        log.warning("attempt %d at %s failed (%s); retrying", work.attempts, work.name, work.errors[-1])
        return True
    return False
