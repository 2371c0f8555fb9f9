"""`vqpipe`: run the pipeline, show what is stale, serve it on a schedule, check params.

vqpipe run [--stage train_prior ...] [--force] [--no-wait]
vqpipe status
vqpipe exp run -S train_prior.lr=1e-3 --queue   # then: vqpipe exp run --run-all; vqpipe exp show
vqpipe serve --cron "0 3 * * *"          # or --interval 6h
vqpipe pull                              # outputs from the DVC remote; vqpipe push, vqpipe gc --dry-run
vqpipe validate [--profile profiles/gpu-256.yaml]
vqpipe apply-profile profiles/gpu-256.yaml
vqpipe import-tokenizer --format llamagen vq_ds16_c2i.pt --output models/llamagen-vq16
vqpipe tokenize --tokenizer models/tokenizer --input 'data/{00000..00099}.tar' --output tokens/
vqpipe export --input tokens/ --output lm/ --format bin --captions
vqpipe sample --n 64 --class 3 --guidance 2.0 --out grid.png
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from components.config import ConfigError, SamplingOptions, load_params
from components.data.corpus import expand_inputs
from components.data.lm_export import ExportError
from components.metrics import save_grid
from components.tokenizers import Tokenizer
from components.tokenizers.published import MODELS, CheckpointError, convert_checkpoint
from components.tokenizers.tokenizer import CONFIG_FILE
from flows import experiments
from flows.arguments import build_parser
from flows.checkpoints import finished_checkpoints
from flows.dvc import STAGES, StageFailed, downstream, missing_params, stage_status
from flows.lock import ProjectBusy, project_lock
from flows.profiles import apply_profile
from flows.remote import RemoteError, gc, pull, push
from pipelines.corpus import resolve_tokenizer
from pipelines.corpus.planning import OutputBusy
from pipelines.lifecycle import exit_on_signals
from pipelines.lm_export import export_lm, log_to_mlflow
from pipelines.runtime import setup_logging
from pipelines.sample import SampleRequest, draw, load_models
from pipelines.tracking import MLFLOW_SCHEMES, tracking_uri, use_experiment

# Prefect's server tries to send telemetry at start; there is no network to send it to.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral Prefect API gets 20 s to start by default; its first start after an install
# (byte-compiling the server, migrating its database) took longer on a 2-core machine and failed
# `make run`. A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


BUSY = 3  # exit status of `vqpipe run --no-wait` when another run holds the project


def _check_params(repo: Path, profile: str | None = None) -> int:
    try:
        load_params(repo / "params.yaml", profile)
        missing = missing_params(repo)
        if missing:
            raise ConfigError(missing, str(repo / "params.yaml"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args) -> int:
    repo = Path(args.repo).resolve()
    if code := _check_params(repo):
        return code
    try:  # before Prefect starts: a run told not to wait learns at once that it cannot go
        with project_lock(repo, wait=not args.no_wait, command=" ".join(["vqpipe", *sys.argv[1:]]), on_wait=_say):
            from flows.pipeline import pipeline

            result = pipeline(repo=str(repo), stages=args.stage or None, force=args.force, wait=not args.no_wait)
    except ProjectBusy as err:
        print(f"error: {err}\n(`vqpipe run` without --no-wait waits for it)", file=sys.stderr)
        return BUSY
    except StageFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except RemoteError as err:
        print(f"\nerror: the stages ran, but pushing their outputs failed: {err}", file=sys.stderr)
        return 1
    print("\nstage               result")
    for r in result["stages"]:
        print(f"{r['stage']:<19} {'ran' if r['ran'] else 'skipped (unchanged)'}")
    print(f"\nDVC remote: {result['pushed']}")
    _print_outputs(repo, result["mlflow_run_id"])
    return 0


def cmd_exp(args) -> int:
    """`vqpipe exp run` / `vqpipe exp show` (flows/experiments.py)."""
    repo = Path(args.repo).resolve()
    if args.exp_command == "show":
        try:
            print(experiments.table(experiments.experiments(repo)))
        except experiments.ExperimentError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if code := _check_params(repo):
        return code
    if args.run_all and args.set_param:
        print("error: --run-all runs the queue as it is; queue experiments with -S ... --queue", file=sys.stderr)
        return 2
    try:
        overrides = experiments.parse_overrides(repo, args.set_param)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = " ".join(["vqpipe", *sys.argv[1:]])
    # Queued experiments run in DVC's temporary workspaces: only one in the workspace takes the lock.
    in_workspace = not (args.queue or args.run_all)
    lock = project_lock(repo, wait=not args.no_wait, command=command, on_wait=_say)
    try:
        with lock if in_workspace else contextlib.nullcontext():
            experiments.exp_run(repo, overrides, queue=args.queue, name=args.name, run_all=args.run_all, jobs=args.jobs)
    except ProjectBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return BUSY
    except experiments.ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.queue:
        print(f"\n{experiments.table(experiments.experiments(repo))}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_pull(args) -> int:
    return _transfer(args, pull, "`vqpipe status` shows what is up to date")


def cmd_push(args) -> int:
    return _transfer(args, push, "`vqpipe pull` restores them elsewhere")


def _transfer(args, move, after: str) -> int:
    """`vqpipe pull` / `vqpipe push`: under the project lock, DVC's lines as they come."""
    repo = Path(args.repo).resolve()
    started = time.perf_counter()
    try:
        with project_lock(repo, command=f"vqpipe {args.command}", on_wait=_say):
            summary = move(repo, on_line=print)
    except RemoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{summary} in {time.perf_counter() - started:.1f} s; {after}")
    return 0


def cmd_gc(args) -> int:
    repo = Path(args.repo).resolve()
    if code := _check_params(repo):
        return code
    params = load_params(repo / "params.yaml")
    try:
        with project_lock(repo, command="vqpipe gc", on_wait=_say):
            verb = "would remove" if args.dry_run else "removing"
            for stage, directory, reason in finished_checkpoints(repo, params):
                print(f"{verb} checkpoint {directory} ({stage}: {reason})")
                if not args.dry_run:
                    shutil.rmtree(directory)
            gc(repo, args.dry_run, args.cloud, args.keep, on_line=print)
    except RemoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _print_outputs(repo: Path, run_id: str) -> None:
    def show(rel: str, what: str) -> None:
        path = repo / rel
        if path.exists():
            print(f"  {what:<16} {path}")

    print("\noutputs:")
    show("samples/grid.png", "sample grid")
    show("eval/reconstructions.png", "reconstructions")
    show("metrics/evaluate.json", "metrics")
    show("models/tokenizer", "tokenizer")
    show("data/tokens", "token shards")
    show("data/lm/meta.json", "LM export")
    metrics = repo / "metrics" / "evaluate.json"
    if metrics.exists():
        values = json.loads(metrics.read_text())
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    uri = tracking_uri(repo)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    print(
        f"\nMLflow run {run_id}; open the UI with:\n"
        f"  {mlflow_cmd} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    )


def cmd_status(args) -> int:
    repo = Path(args.repo).resolve()
    if code := _check_params(repo):
        return code

    stale = stage_status(repo)
    waiting = downstream(repo, set(stale))
    for stage in STAGES:
        if stage in stale:
            print(f"{stage:<19} stale")
            for reason in stale[stage]:
                print(f"    {reason}")
        elif stage in waiting:
            print(f"{stage:<19} up to date, reruns if {', '.join(waiting[stage])} changes its outputs")
        else:
            print(f"{stage:<19} up to date")
    return 0


def cmd_serve(args) -> int:
    repo = Path(args.repo).resolve()
    if code := _check_params(repo):
        return code
    from prefect import serve

    from flows.pipeline import scheduled_deployment

    deployment = scheduled_deployment(str(repo), cron=args.cron, interval=args.interval, name=args.name)
    when = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(f"serving {args.name!r} on {when} for {repo}, one run at a time; Ctrl-C stops", flush=True)
    serve(deployment)
    return 0


def cmd_validate(args) -> int:
    code = _check_params(Path(args.repo).resolve(), args.profile)
    if code == 0:
        print("params.yaml is valid" + (f" with profile {args.profile}" if args.profile else ""))
    return code


def cmd_apply_profile(args) -> int:
    repo = Path(args.repo).resolve()
    try:
        changes = apply_profile(repo / "params.yaml", args.profile)
    except ConfigError as err:
        print(f"error: {err}\nparams.yaml is unchanged", file=sys.stderr)
        return 2
    for key, old, new in changes:
        print(f"  {key}: {old!r} -> {new!r}")
    print(f"{len(changes)} value(s) of {args.profile} written to {repo / 'params.yaml'}; `vqpipe status` shows")
    print("what they make stale, `vqpipe run` reruns it (`git diff params.yaml` shows the change)")
    return 0


def cmd_import_tokenizer(args) -> int:
    out = Path(args.output)
    if (out / CONFIG_FILE).exists() and not args.overwrite:
        print(f"error: {out} already holds a tokenizer export (--overwrite replaces it)", file=sys.stderr)
        return 2
    try:
        config, model, notes = convert_checkpoint(args.format, args.checkpoint, args.model, args.image_size)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer(model, config)
    tokenizer.save(out)
    source = config["imported_from"]
    spec = MODELS[source["format"]][source["model"]]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{source['format']} {source['model']}: " + "; ".join(notes))
    print(
        f"{parameters / 1e6:.1f}M parameters, {tokenizer.codebook_size} codes, {args.image_size} px -> "
        f"{'x'.join(map(str, tokenizer.grid))} tokens; published rFID {spec.rfid}"
    )
    print(f"tokenizer {tokenizer.fingerprint[:12]} written to {out}")
    print(f"  vqpipe tokenize --tokenizer {out} --input 'SHARDS' --output TOKENS")
    return 0


def cmd_tokenize(args) -> int:
    if not args.tokenizer.startswith(MLFLOW_SCHEMES):
        try:  # a wrong local path fails here, before Prefect and Ray start
            resolve_tokenizer(args.tokenizer, ".")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    limits = {
        "max_image_pixels": args.max_image_pixels,
        "max_member_bytes": args.max_member_bytes,
        "pipe_idle_timeout": args.pipe_idle_timeout,
        "shard_timeout": args.shard_timeout,
        "allow_pipe_in_lists": args.allow_pipe,
    }
    # A list that includes itself or holds commands fails here, before Prefect and Ray start;
    # globs are listed once, by the flow.
    try:
        expand_inputs(args.input, args.allow_pipe, list_globs=False)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flows.tokenize import ShardsFailed, tokenize_flow

    setup_logging()  # the plan, retries and failures (vqpipe.tokenize) beside Prefect's lines
    logging.getLogger("vqpipe").setLevel(logging.INFO)
    try:
        summary = tokenize_flow(
            tokenizer=args.tokenizer,
            inputs=args.input,
            output=args.output,
            batch_size=args.batch_size,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            device=args.device,
            decode_threads=args.decode_threads,
            retries=args.retries,
            overwrite=args.overwrite,
            in_process=args.in_process,
            ray_address=args.ray_address,
            progress_bar=sys.stderr.isatty(),
            limits=limits,
        )
    except ShardsFailed as err:
        _print_tokenize_summary(err.summary)
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # no shards match, a tokenizer that is not one, bad settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_tokenize_summary(summary)
    return 0


def cmd_export(args) -> int:
    setup_logging()
    logging.getLogger("vqpipe").setLevel(logging.INFO)
    try:
        with _export_run(args) as track:
            result = export_lm(
                args.input,
                args.output,
                args.format,
                captions=args.captions,
                text_tokenizer=args.text_tokenizer,
                max_caption_tokens=args.max_caption_tokens,
                overwrite=args.overwrite,
                batch_rows=args.batch_rows,
            )
            if track:
                log_to_mlflow(result)
    except (ExportError, OutputBusy, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = result.meta
    splits = ", ".join(f"{name} {s['images']} images ({s['ids']} ids)" for name, s in meta["splits"].items())
    print(
        f"\n{result.output}: {meta['format']}, {meta['dtype']}, vocab_size {meta['vocab_size']} "
        f"(text {meta['text_vocab_size']}, image codes from {meta['image_offset']}, "
        f"boi {meta['special_tokens']['boi']}, eoi {meta['special_tokens']['eoi']})\n{splits}\n"
        + (
            "already complete: nothing to do"
            if result.already_complete
            else f"this run: {result.parts_written} parts ({result.parts_skipped} done before), {result.rows} rows "
            f"in {result.seconds:.1f} s ({result.rows_per_second:.0f} rows/s, {result.mb_per_second:.1f} MB/s)"
        )
        + f"\nmeta: {result.output / 'meta.json'}"
    )
    return 0


@contextlib.contextmanager
def _export_run(args):
    """An MLflow run for `vqpipe export` (the project's store, or MLFLOW_TRACKING_URI) unless
    --no-track; yields whether there is one. It is FAILED when the export fails."""
    if args.no_track:
        yield False
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(args.repo))
    use_experiment()
    with mlflow.start_run(run_name="export", tags={"vqpipe.command": "vqpipe export"}):
        mlflow.log_params({"export.input": args.input, "export.output": str(Path(args.output).resolve())})
        yield True


def cmd_sample(args) -> int:
    repo = Path(args.repo)

    def in_repo(spec: str) -> str:  # local paths are the project's; MLflow URIs stay as they are
        return spec if spec.startswith(MLFLOW_SCHEMES) else str(repo / spec)

    try:
        request = SampleRequest(
            n=args.n,
            class_=getattr(args, "class"),
            prompt=args.prompt,
            options=_sampling_options(repo, args),
            seed=args.seed,
            batch_size=args.batch_size,
        )
        models = load_models(
            in_repo(args.prior),
            in_repo(args.tokenizer) if args.tokenizer else None,
            device=args.device,
            default_tokenizer=str(repo / "models" / "tokenizer"),
            root=repo,
        )
        drawn = draw(models, request)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    save_grid(drawn.images, out, nrow=math.ceil(math.sqrt(args.n)), upscale=args.upscale)
    what = ""
    if drawn.labels is not None:
        first = int(drawn.labels[0])
        same = bool((drawn.labels == first).all())
        name = drawn.class_names[first] if drawn.class_names and same else None
        what = f" of class {first}{f' ({name})' if name else ''}" if same else " (classes round-robin)"
    if request.prompt is not None:
        what = f" of {request.prompt!r}"
    guide = request.options.guidance_scale
    ramp = " (linear ramp)" if request.options.guidance_schedule == "linear" else ""
    guided = f", guidance {guide:g}{ramp}" if guide != 1.0 else ""
    print(f"{args.n} samples{what}{guided} at {drawn.tokens_per_second:.0f} tokens/s -> {out}")
    return 0


SAMPLING_FLAGS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "guidance_scale": "--guidance",
    "guidance_schedule": "--guidance-schedule",
    "decode_steps": "--decode-steps",
    "choice_temperature": "--choice-temperature",
}


def _sampling_options(repo: Path, args) -> SamplingOptions:
    """The project's `sample.sampling` (params.yaml; the built-in defaults without one), with
    the flags given on the command line in place of its values. ValueError naming the flag."""
    params = repo / "params.yaml"
    base = load_params(params).sample.sampling if params.is_file() else SamplingOptions()
    given = {key: getattr(args, key) for key in SAMPLING_FLAGS if getattr(args, key) is not None}
    try:
        return SamplingOptions.model_validate({**base.model_dump(), **given})
    except ValidationError as err:
        problems = [f"{SAMPLING_FLAGS[e['loc'][0]]}: {e['msg']}" for e in err.errors()]
        raise ValueError("; ".join(problems)) from None


def _print_tokenize_summary(summary: dict) -> None:
    print(
        f"\n{summary['inputs']} input shards: {summary['tokenized']} tokenized, {summary['skipped']} already complete, "
        f"{len(summary['failed'])} failed\n"
        f"{summary['rows']} rows from {summary['samples']} samples "
        f"({summary['rejected']} rejected, listed in the manifest)\n"
        f"this run: {summary['images_this_run']} images in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:.0f} images/s)"
        + (
            f" on {summary['ray_nodes']} Ray node{'s' if summary['ray_nodes'] > 1 else ''}"
            if summary["ray_nodes"]
            else ""
        )
        + "\n"
        f"manifest: {summary['manifest']}"
    )


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "exp": cmd_exp,
    "serve": cmd_serve,
    "validate": cmd_validate,
    "apply-profile": cmd_apply_profile,
    "import-tokenizer": cmd_import_tokenizer,
    "tokenize": cmd_tokenize,
    "export": cmd_export,
    "sample": cmd_sample,
    "pull": cmd_pull,
    "push": cmd_push,
    "gc": cmd_gc,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        exit_on_signals()  # SIGTERM ends a command as Ctrl-C does: children stopped, temporaries removed
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
