"""A corpus tokenization job: what to tokenize where and how (`CorpusJob`), the work per
input shard, and what a run did (`CorpusResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.settings import TokenizeConfig

TOKENIZE = TokenizeConfig()


@dataclass
class CorpusJob:
    inputs: list[str]  # shard URLs (see components.data.corpus.expand_inputs)
    output: str  # directory: a local path or any fsspec URL
    tokenizer: str  # export directory or MLflow URI
    # The defaults are the `tokenize` stage's (components/settings.py TokenizeConfig).
    batch_size: int = TOKENIZE.batch_size
    actors: int | None = None  # Ray actors; None: as many as the cluster's CPUs (GPUs) allow
    cpus_per_actor: float = TOKENIZE.cpus_per_actor
    gpus_per_actor: float = TOKENIZE.gpus_per_actor
    device: str = TOKENIZE.device
    decode_threads: int | None = None  # per actor; None: one per CPU of the actor
    retries: int = 2  # further attempts at a shard that failed
    retry_delay: float = 1.0  # seconds before a retry, times the attempt
    overwrite: bool = False
    in_process: bool = False  # no Ray: one actor's work in this process
    ray_address: str | None = None
    names: dict[str, str] | None = None  # input URL -> the name recorded for it (default: the URL)
    limits: ReadLimits = DEFAULT_LIMITS  # pixels, bytes and seconds one input may cost

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("no input shards")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


@dataclass
class CorpusResult:
    manifest: dict
    tokenized: int  # parts written by this run
    skipped: int  # complete parts of the same tokenizer, kept
    failed: list[dict]  # {"input_shard", "part", "error", "attempts"}
    images: int  # rows written by this run
    seconds: float  # wall time of the tokenizing, from the actors ready to the last part written
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> shards it tokenized

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ShardWork:
    url: str
    name: str
    part: str
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    isolate: bool = False  # runs alone on an actor (its actor died while it shared one)
