"""Who tokenizes the shards: a pool of Ray actors (`run_on_ray`), or one actor's work in this
process (`run_in_process`). Each actor loads the tokenizer once (its files travel through Ray's
object store, so actors need no shared disk) and holds two shards at once, one forward pass at
a time, so one shard is read, decoded and written while the other computes. A shard that fails
is retried behind the rest of the queue, then reported as failed while the rest completes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from components.data.corpus import ShardUnreadable, stop_reading
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

    pool = ThreadPoolExecutor(SHARDS_AT_ONCE, thread_name_prefix="shard")
    try:
        for future in [pool.submit(attempt, work) for work in todo]:
            future.result()
    except BaseException as err:
        if not isinstance(err, Exception):  # Ctrl-C, SIGTERM (ours, or Prefect's TerminationSignal)
            pool.shutdown(wait=False, cancel_futures=True)  # no shard starts
            stop_reading()  # and the running ones stop reading
        raise
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(previous_threads)
    return began


def run_on_ray(job: CorpusJob, files: dict, todo: list[ShardWork], out: str, finished) -> float:
    """Tokenize `todo` on a pool of Ray actors, at most SHARDS_AT_ONCE shards queued per actor
    (memory stays bounded whatever the corpus); returns when the actors were ready.

    A shard whose actor died under it while another shard was also on it is not charged the
    attempt (either could have killed it): it goes back to the queue to run alone on an actor,
    where a death is its own. An actor that died is checked before it gets more work: Ray
    restarts it (max_restarts), and one dead for good is replaced (REPLACEMENTS per actor at
    most) or dropped, so the rest of the queue never burns its attempts on a dead actor."""
    ray = init_ray(address=job.ray_address)
    new_actor, count = _actor_maker(ray, job, files, len(todo))
    actors: list = [new_actor() for _ in range(count)]
    ray.get([a.node.remote() for a in actors])
    replacements = REPLACEMENTS * count
    began = time.perf_counter()
    log.info(
        "tokenizing %d shards on %d Ray actors (%g CPU, %g GPU each)",
        *(len(todo), len(actors), job.cpus_per_actor, job.gpus_per_actor),
    )
    queue = list(todo)  # taken from the front: input order; retries go to the back
    inflight: dict = {}  # object ref -> (actor index, work)
    suspect: set[int] = set()  # actors that died under a shard: checked before more work
    shared_death: set[int] = set()  # shards in flight beside another when their actor died

    def running_on(i: int) -> list[ShardWork]:
        return [w for j, w in inflight.values() if j == i]

    try:
        while queue or inflight:
            for i in sorted(suspect):
                if not running_on(i):  # its other in-flight task has failed too by now
                    suspect.discard(i)
                    actors[i], replacements = _healthy(ray, actors[i], new_actor, replacements)
            for i, actor in enumerate(actors):
                if actor is None or i in suspect:
                    continue
                running = running_on(i)
                # A shard that must run alone takes an idle actor and keeps it to itself.
                while queue and len(running) < SHARDS_AT_ONCE and not any(w.isolate for w in running):
                    pick = next((n for n, w in enumerate(queue) if not w.isolate or not running), None)
                    if pick is None:
                        break
                    work = queue.pop(pick)
                    work.attempts += 1
                    ref = actor.tokenize.remote(work.url, out, work.part, work.name, job.batch_size, job.limits)
                    inflight[ref] = (i, work)
                    running.append(work)
            if not inflight:
                if all(a is None for a in actors):
                    for work in queue:  # nothing can run them: report, do not hang
                        work.errors.append("no Ray actor left to run it (every actor died and none could be started)")
                        finished(work, None)
                    queue.clear()
                continue
            # With a timeout: a signal's handler runs only between Python steps.
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                i, work = inflight.pop(ref)
                peers = running_on(i)  # shards still on the same actor
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a task error, or the actor died
                    if isinstance(err, ray.exceptions.RayActorError):
                        suspect.add(i)
                        # Every shard on the actor when it died shares the death, whichever
                        # of them reports first.
                        shared = bool(peers) or id(work) in shared_death
                        if shared:
                            shared_death.update(id(w) for w in peers)
                        shared_death.discard(id(work))
                        if shared and not work.isolate:  # either shard may have killed it
                            work.attempts -= 1
                            work.isolate = True
                            log.warning("the actor of %s died with another shard on it: retrying it alone", work.name)
                            queue.append(work)
                            continue
                    if _retry(job, work, err):
                        queue.append(work)  # behind the rest: time for a transient fault to pass
                        continue
                    outcome = None
                finished(work, outcome)
    finally:
        for actor in actors:
            if actor is not None:
                ray.kill(actor)
    return began


REPLACEMENTS = 2  # actors started in place of dead ones, per actor of the pool
ACTOR_START_TIMEOUT = 120.0  # seconds for a replacement to start (a cluster may have lost the node)


def _healthy(ray, actor, new_actor, replacements: int) -> tuple:
    """The actor if it answers (Ray restarts a dead actor up to max_restarts times), else a new
    one while `replacements` last, else None (dropped from the pool); and the replacements left."""
    deadline = time.monotonic() + ACTOR_START_TIMEOUT
    while True:
        try:
            ray.get(actor.node.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return actor, replacements
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            reason = "not back in time"
        except Exception as err:  # noqa: BLE001 - dead for good (restarts spent), or not back in time
            reason = type(err).__name__
        log.warning("a Ray actor is gone (%s)", reason)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        break
    while replacements > 0:
        replacements -= 1
        fresh = new_actor()
        try:
            ray.get(fresh.node.remote(), timeout=ACTOR_START_TIMEOUT)
            log.warning("started a Ray actor in its place (%d more replacements allowed)", replacements)
            return fresh, replacements
        except Exception as err:  # noqa: BLE001 - could not start: try another, then give up
            log.warning("a replacement Ray actor did not start (%s)", type(err).__name__)
            with contextlib.suppress(Exception):
                ray.kill(fresh)
    log.error("a Ray actor died and could not be replaced: the pool goes on without it")
    return None, replacements


def _actor_maker(ray, job: CorpusJob, files: dict, shards: int):
    """A function starting one actor with the tokenizer loaded, and how many to start: as many
    as the job asks for, else as the cluster's CPUs (GPUs) allow, never more than there are
    shards."""
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
    return (lambda: actor_cls.remote(files_ref, device, threads, job.decode_threads or threads)), count


def _retry(job: CorpusJob, work: ShardWork, err: BaseException) -> bool:
    """Record a failed attempt; whether the shard gets another."""
    work.errors.append(_describe(err))
    if work.attempts <= job.retries:
        log.warning("attempt %d at %s failed (%s); retrying", work.attempts, work.name, work.errors[-1])
        return True
    return False
