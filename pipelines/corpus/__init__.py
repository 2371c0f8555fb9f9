"""The corpus tokenizer behind the `tokenize` stage and `vqpipe tokenize`: image shards in,
one Parquet token part per shard out (see `components.data.tokenization`).

    job = CorpusJob(inputs=urls, output="s3://bucket/tokens", tokenizer="models:/vqpipe-tokenizer@champion")
    result = tokenize_corpus(job)

`job` (what and how), `planning` (what is complete, what is left; the tokenizer), `pool` (the
Ray actors, or this process, doing the shards), `runner` (the whole job and its manifest).
"""

from pipelines.corpus.job import CorpusJob, CorpusResult, ShardWork
from pipelines.corpus.planning import CorpusPlan, load_tokenizer_files, plan_corpus, resolve_tokenizer
from pipelines.corpus.pool import SHARDS_AT_ONCE, ShardActor
from pipelines.corpus.runner import corpus_manifest, tokenize_corpus

__all__ = [
    "SHARDS_AT_ONCE",
    "CorpusJob",
    "CorpusPlan",
    "CorpusResult",
    "ShardActor",
    "ShardWork",
    "corpus_manifest",
    "load_tokenizer_files",
    "plan_corpus",
    "resolve_tokenizer",
    "tokenize_corpus",
]
