"""The `vqpipe` command line: its commands, flags and defaults (flows/cli.py runs them)."""

from __future__ import annotations

import argparse

from components.config import ExportConfig, SampleConfig
from components.data.limits import DEFAULT_LIMITS
from components.tokenizers.published import DEFAULT_MODEL, FORMATS, MODELS
from flows.dvc import STAGES
from pipelines.corpus.job import TOKENIZE

SAMPLE = SampleConfig()  # `vqpipe sample`'s defaults are the sample stage's
EXPORT = ExportConfig()  # and `vqpipe export`'s the export stage's


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqpipe", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=".", help="the project (a DVC repo); default: current directory")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_tokenize(sub)
    _add_export(sub)
    _add_sample(sub)
    return parser


def _add_pipeline_commands(sub) -> None:
    run = sub.add_parser("run", help="run the pipeline flow (DVC skips stages that are up to date)")
    run.add_argument(
        "--stage", action="append", choices=STAGES, help="only this stage (repeatable); default: all, in DAG order"
    )
    run.add_argument("--force", action="store_true", help="rerun stages even when DVC finds them up to date")
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run holds the project, exit at once with status 3 naming it (default: wait for it)",
    )

    sub.add_parser("status", help="which stages are stale, and why (from DVC)")

    exp = sub.add_parser("exp", help="DVC experiments: run or queue one with other params, show them all")
    exp_sub = exp.add_subparsers(dest="exp_command", required=True)
    exp_run = exp_sub.add_parser(
        "run",
        help="run (or queue) an experiment: `dvc exp run` with params checked first",
        description="Values are read as YAML 1.2 reads them (1e-3 is a number). Each experiment is an MLflow "
        "parent run tagged with its DVC name and changed params, in the project's store.",
    )
    exp_run.add_argument(
        "-S",
        "--set-param",
        dest="set_param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param to change, e.g. train_prior.lr=1e-3 (repeatable)",
    )
    exp_run.add_argument("--queue", action="store_true", help="queue it; `vqpipe exp run --run-all` runs the queue")
    exp_run.add_argument("-n", "--name", default=None, help="the experiment's name (default: DVC makes one)")
    exp_run.add_argument(
        "--run-all", action="store_true", help="run every queued experiment, each in a temporary workspace, and wait"
    )
    exp_run.add_argument("-j", "--jobs", type=int, default=1, help="queued experiments run at once (--run-all)")
    exp_run.add_argument("--no-wait", action="store_true", help="as for `vqpipe run` (an experiment in the workspace)")
    exp_sub.add_parser("show", help="the experiments of the current commit: changed params and headline metrics")

    serve = sub.add_parser(
        "serve",
        help="serve the flow on a schedule (one run at a time)",
        description="Registers the pipeline as a Prefect deployment with the schedule and runs its flow runs "
        "in this process, one at a time, until stopped. PREFECT_API_URL names the Prefect server (docs/operations.md).",
    )
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron expression, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=_duration, help="every so long: 30s, 15m, 6h, 1d (or seconds)")
    serve.add_argument("--name", default="vqpipe-scheduled", help="deployment name")

    sub.add_parser(
        "pull", help="restore the outputs dvc.lock records from the DVC remote (instead of recomputing them)"
    )
    sub.add_parser("push", help="push the outputs dvc.lock records to the DVC remote (`vqpipe run` does, after a run)")
    gc = sub.add_parser(
        "gc",
        help="drop cached outputs nothing uses any more, and checkpoints of finished training runs",
        description="Keeps what the workspace, every DVC experiment and --keep use; --dry-run lists what would go.",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    gc.add_argument("--cloud", action="store_true", help="also collect garbage on the DVC remote")
    gc.add_argument(
        "--keep",
        choices=("commits", "branches", "workspace"),
        default="commits",
        help="outputs of which git revisions to keep besides the workspace's (default: every commit's)",
    )

    validate = sub.add_parser("validate", help="check params.yaml and exit (status 2 when invalid)")
    validate.add_argument("--profile", default=None, help="check params.yaml with this profile's values over it")

    profile = sub.add_parser(
        "apply-profile",
        help="write a params profile's values into params.yaml (e.g. profiles/gpu-256.yaml)",
        description="Validates params.yaml with the profile's values first; writes nothing when invalid. "
        "DVC then reruns exactly the stages the changed keys feed.",
    )
    profile.add_argument("profile", help="a YAML file of params.yaml sections with the values to change")

    imp = sub.add_parser(
        "import-tokenizer",
        help="convert a published tokenizer checkpoint (LlamaGen, taming-transformers) into a vqpipe export",
        description="Reads the checkpoint with torch.load(weights_only=True); every tensor is checked against "
        "the model named by --model. The export works with vqpipe tokenize, the prior and Tokenizer.load.",
    )
    imp.add_argument("checkpoint", help="the .pt / .ckpt file")
    imp.add_argument("--format", required=True, choices=FORMATS, help="whose checkpoint it is")
    imp.add_argument(
        "--model",
        default=None,
        help="the published configuration: "
        + "; ".join(f"{fmt}: {', '.join(MODELS[fmt])} (default {DEFAULT_MODEL[fmt]})" for fmt in FORMATS),
    )
    imp.add_argument("--output", required=True, help="the export directory to write")
    imp.add_argument("--image-size", type=_positive, default=256, help="images it tokenizes (default 256)")
    imp.add_argument("--overwrite", action="store_true", help="replace an export already in --output")


def _duration(text: str) -> float:
    """Seconds from `90`, `30s`, `15m`, `6h` or `1d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 15m, 6h, 1d)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return seconds


def _add_tokenize(sub) -> None:
    tok = sub.add_parser(
        "tokenize",
        help="tokenize an image corpus (WebDataset shards) into Parquet token parts, on Ray",
        description="One Parquet part per input shard; a rerun keeps complete parts of the same tokenizer and redoes "
        "the rest. Exit status 1 when some shards could not be read (named, and listed in _manifest.json), "
        "2 on bad input.",
    )
    tok.add_argument(
        "--tokenizer",
        required=True,
        help="export directory (config.json + model.safetensors) or MLflow URI, e.g. models:/vqpipe-tokenizer@champion",
    )
    tok.add_argument(
        "--input",
        required=True,
        action="append",
        help="shards: path or URL, {000..099} pattern, glob, @FILE of URLs, pipe:CMD (repeatable)",
    )
    tok.add_argument(
        "--output", required=True, help="directory for the parts: a path or fsspec URL (s3://, gs://, ...)"
    )
    _add_tokenize_runtime(tok)
    _renamed(
        tok, {"--workers": "--actors", "--cpus-per-worker": "--cpus-per-actor", "--gpus-per-worker": "--gpus-per-actor"}
    )


def _add_export(sub) -> None:
    exp = sub.add_parser(
        "export",
        help="token parts -> what a language model trains on: packed ids (bin) or Parquet rows, and meta.json",
        description="Reads a finished token output (vqpipe tokenize's, or data/tokens) a batch at a time; writes "
        "train.bin/val.bin (np.memmap) or {split}-NNNNN.parquet rows of input_ids, key, label, caption; and meta.json "
        "(the vocabulary: text ids, image_offset, codebook sizes, boi/eoi/separators; grids; lineage). A rerun "
        "resumes a killed export and leaves a finished one as it is. The run is recorded in MLflow. "
        "Exit status 2 on bad input. Layout: docs/lm-export.md.",
    )
    exp.add_argument("--input", required=True, help="token parts with their _manifest.json: a path or fsspec URL")
    exp.add_argument("--output", required=True, help="local directory for the export")
    exp.add_argument("--format", choices=("bin", "parquet"), default="bin", help="bin (default) or parquet")
    exp.add_argument(
        "--captions", action="store_true", help="put each image's caption ids before it: [caption] boi [image] eoi"
    )
    exp.add_argument(
        "--text-tokenizer",
        default=None,
        help="a Hugging Face tokenizers JSON file (local) for the captions and the text vocabulary; "
        "default with --captions: UTF-8 bytes (256 ids)",
    )
    exp.add_argument(
        "--max-caption-tokens",
        type=_positive,
        default=EXPORT.max_caption_tokens,
        help=f"longer captions are cut (counted; default {EXPORT.max_caption_tokens})",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an export of other inputs or settings")
    exp.add_argument(
        "--batch-rows",
        type=_positive,
        default=EXPORT.batch_rows,
        help=f"rows converted at once (default {EXPORT.batch_rows})",
    )
    exp.add_argument("--no-track", action="store_true", help="record nothing in MLflow")


def _add_tokenize_runtime(tok: argparse.ArgumentParser) -> None:
    """How the corpus is tokenized (none of these changes the parts)."""
    tok.add_argument(
        "--batch-size",
        type=_positive,
        default=TOKENIZE.batch_size,
        help=f"images per forward pass (default {TOKENIZE.batch_size})",
    )
    tok.add_argument(
        "--actors",
        type=_positive,
        default=None,
        help="Ray actors (default: as many as the cluster's CPUs or GPUs allow)",
    )
    tok.add_argument(
        "--cpus-per-actor",
        type=float,
        default=TOKENIZE.cpus_per_actor,
        help=f"CPUs per actor: torch and decode threads (default {TOKENIZE.cpus_per_actor:g})",
    )
    tok.add_argument(
        "--gpus-per-actor", type=float, default=TOKENIZE.gpus_per_actor, help="GPUs per actor, e.g. 1 (default 0: CPU)"
    )
    tok.add_argument(
        "--device", default=TOKENIZE.device, help="auto|cpu|cuda (default auto: cuda when the actor has a GPU)"
    )
    tok.add_argument(
        "--decode-threads", type=_positive, default=None, help="image decoding threads per actor (default: its CPUs)"
    )
    tok.add_argument("--retries", type=int, default=2, help="further attempts at a shard that fails (default 2)")
    tok.add_argument(
        "--allow-pipe",
        action="store_true",
        help="run pipe: lines found inside @FILE lists (a list file is data; its pipe: lines are shell commands)",
    )
    tok.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=DEFAULT_LIMITS.max_image_pixels,
        help=f"reject images declaring more pixels, undecoded (default {DEFAULT_LIMITS.max_image_pixels:,})",
    )
    tok.add_argument(
        "--max-member-bytes",
        type=_positive,
        default=DEFAULT_LIMITS.max_member_bytes,
        help=f"reject tar members larger than this, unread (default {DEFAULT_LIMITS.max_member_bytes:,})",
    )
    tok.add_argument(
        "--pipe-idle-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.pipe_idle_timeout,
        help=f"kill a pipe: command silent this many seconds (default {DEFAULT_LIMITS.pipe_idle_timeout:g}; 0: none)",
    )
    tok.add_argument(
        "--shard-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.shard_timeout,
        help="give up reading one shard after this many seconds, then retry it (default 0: no limit)",
    )
    tok.add_argument("--overwrite", action="store_true", help="redo every part, complete or not")
    tok.add_argument("--in-process", action="store_true", help="no Ray: tokenize in this process")
    tok.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (auto, host:port, ray://...); default RAY_ADDRESS, else a local Ray",
    )


def _add_sample(sub) -> None:
    smp = sub.add_parser(
        "sample",
        help="draw images from the trained prior into a PNG grid",
        description="Temperature, top-k, top-p, guidance and MaskGIT's decoding settings default to the "
        "project's sample.sampling (params.yaml).",
    )
    smp.add_argument(
        "--n", type=_positive, default=SAMPLE.num_images, help=f"how many images (default {SAMPLE.num_images})"
    )
    smp.add_argument(
        "--class", default=None, help="class id or name (conditional priors; default: every class in turn)"
    )
    smp.add_argument(
        "--prompt",
        default=None,
        help="what to draw, for a text-conditional prior: e.g. 'a green cross on a blue background' ('': none)",
    )
    smp.add_argument(
        "--guidance", dest="guidance_scale", type=float, default=None, help="classifier-free guidance scale (1: none)"
    )
    smp.add_argument(
        "--guidance-schedule",
        dest="guidance_schedule",
        default=None,
        help="constant, or linear: from 1 at the first token or step to --guidance at the last",
    )
    smp.add_argument(
        "--decode-steps", dest="decode_steps", type=int, default=None, help="MaskGIT priors: parallel decoding steps"
    )
    smp.add_argument(
        "--choice-temperature",
        dest="choice_temperature",
        type=float,
        default=None,
        help="MaskGIT priors: noise on which tokens each step keeps (annealed to 0)",
    )
    smp.add_argument("--temperature", type=float, default=None)
    smp.add_argument("--top-k", type=int, default=None)
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--seed", type=int, default=SAMPLE.seed)
    smp.add_argument("--batch-size", type=_positive, default=SAMPLE.batch_size)
    smp.add_argument("--device", default=SAMPLE.device)
    smp.add_argument(
        "--prior",
        default="models/prior",
        help="export directory or MLflow URI, e.g. models:/vqpipe-prior@champion (default: models/prior)",
    )
    smp.add_argument(
        "--tokenizer",
        default=None,
        help="default: the tokenizer registered with an MLflow prior, else models/tokenizer",
    )
    smp.add_argument("--upscale", type=_positive, default=2, help="pixel upscaling of the grid (default 2)")
    smp.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    _renamed(smp, {"--cfg": "--guidance"})


def _renamed(parser: argparse.ArgumentParser, renames: dict[str, str]) -> None:
    """Flags of an earlier version: refused, naming the new one (exit 2), never silently ignored."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} was renamed to {renames[option_string]} (see CHANGELOG.md)")

    for old in renames:
        parser.add_argument(old, action=Renamed, help=argparse.SUPPRESS)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
