"""The MLflow model registry: trained tokenizers and priors as pyfunc models, and which version
is `@champion`.

Registration (train_tokenizer, train_prior): the export is logged as an MLflow model with a
pyfunc flavor built from code (`pipelines/serving`: nothing pickled) and becomes a version of
the stage's `registered_model`, tagged with the export's sha256. An export already registered
(a stage retried after it finished, which resumes from its finished checkpoint and exports the
same files) gets no second version.

Promotion (after evaluate): the versions of the project's tokenizer and prior are compared with
their `@champion` on one metric measured on the same footing (`evaluate.promote_tokenizer_on`,
PSNR by default, on the same validation split; the prior's bits per token on the same
validation tokens of the same tokenizer). Better: `@champion` moves to the new version.
Otherwise it gets `@challenger`. The reason is a tag of the version (`vqpipe.promotion`). A
champion measured on other data is measured again on this data (PSNR/SSIM, bits per token); a
prior of another tokenizer cannot be compared: the new prior follows its tokenizer (champion if
its tokenizer is the champion tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import components
from components.data import tokens as token_io
from components.data.captions import caption_matrix
from components.data.part_footers import parts_identity
from components.data.shards import read_manifest, sha256_file, split_batches, to_float
from components.metrics import PriorBits, psnr, ssim
from components.metrics.reconstruction import as_uint8_images
from components.priors import load_prior
from components.tokenizers import Tokenizer
from pipelines.tracking import EXPORT_FILES, fetch_export

log = logging.getLogger("vqpipe.registry")
SERVING = Path(__file__).parent / "serving"
DIGEST_TAG = "vqpipe.export_sha256"
FINGERPRINT_TAG = "vqpipe.tokenizer_fingerprint"
REASON_TAG = "vqpipe.promotion"
FOOTING_TAG = "vqpipe.eval_footing"
PRIOR_KIND_TAG = "vqpipe.prior_kind"  # ar | maskgit; versions registered before it are ar
PRIOR_CONDITION_TAG = "vqpipe.prior_condition"  # class | text | none; versions before it: class or none
CHAMPION, CHALLENGER = "champion", "challenger"
# What a loaded model needs besides vqpipe itself (installed where it is loaded).
REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "pillow", "pydantic", "pyarrow")


def export_digest(export: str | Path) -> str:
    """sha256 of an export: of its config.json's and model.safetensors' sha256s."""
    return hashlib.sha256("".join(sha256_file(Path(export) / name) for name in EXPORT_FILES).encode()).hexdigest()


def _requirements() -> list[str]:
    pins = []
    for name in ("mlflow", *REQUIREMENTS):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _signature(kind: str):
    """No input schema (images or class rows of any size); the params `predict` takes, with
    their defaults (MLflow passes a model only the params its signature declares)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    if kind == "tokenizer":
        specs = [ParamSpec("batch_size", "long", 64)]
    else:
        specs = [
            ParamSpec("output", "string", "tokens"),
            ParamSpec("seed", "long", 0),
            ParamSpec("temperature", "double", 1.0),
            ParamSpec("top_k", "long", None),
            ParamSpec("top_p", "double", None),
            ParamSpec("guidance_scale", "double", 1.0),
            ParamSpec("guidance_schedule", "string", "constant"),
            ParamSpec("decode_steps", "long", 10),
            ParamSpec("choice_temperature", "double", 4.5),
        ]
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema(specs))


def register(
    kind: str,
    name: str,
    export: Path,
    fingerprint: str,
    description: str,
    bundled: dict[str, Path] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """The export as a pyfunc model of the active MLflow run, registered as a new version of
    `name`; or the version that already holds this very export. `kind`: tokenizer | prior (its
    model code in `pipelines/serving`); `bundled`: folders to put inside the export's copy
    (the prior's tokenizer); `tags`: more version tags. Returns the version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    digest = export_digest(export)
    held = _holding(client, name, digest)
    if held is not None:
        log.info("%s version %s already holds this export: not registered again", name, held)
        return held
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"{description}: pyfunc models (vqpipe)")
    with tempfile.TemporaryDirectory(prefix="vqpipe-model-") as tmp:
        staged = Path(tmp) / kind
        shutil.copytree(export, staged)
        for sub, folder in (bundled or {}).items():
            shutil.copytree(folder, staged / sub)
        info = mlflow.pyfunc.log_model(
            name=f"{kind}_pyfunc",  # also the run's artifact folder: beside the export's, not in it
            python_model=str(SERVING / f"{kind}_model.py"),
            artifacts={"export" if kind == "tokenizer" else "prior": str(staged)},
            pip_requirements=_requirements(),
            signature=_signature(kind),
            metadata={"vqpipe_version": components.__version__, "export_sha256": digest},
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, DIGEST_TAG, digest)
    client.set_model_version_tag(name, version, FINGERPRINT_TAG, fingerprint)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return version


def version_of(name: str, export: str | Path) -> str | None:
    """The version of `name` that holds this export (by sha256), if any."""
    from mlflow.tracking import MlflowClient

    return _holding(MlflowClient(), name, export_digest(export))


def _holding(client, name: str, digest: str) -> str | None:
    for found in client.search_model_versions(f"name='{name}'", max_results=10000):
        if found.tags.get(DIGEST_TAG) == digest:
            return str(found.version)
    return None


@dataclass
class Candidate:
    """A new version and its figure on a footing (what the figure was measured on)."""

    name: str
    version: str
    metric: str
    value: float
    footing: str
    higher_is_better: bool
    # The champion's figure on this footing, when its recorded one is on another (None: cannot).
    remeasure: Callable[[str], float | None] | None = None
    # For a champion on another footing, from its version tags: (reason, promote?) when it
    # cannot be compared at all; None when `remeasure` may measure it.
    incomparable: Callable[[dict], tuple[str, bool] | None] | None = None


def promote(candidate: Candidate) -> tuple[str, str]:
    """Move `@champion` to the candidate when it beats the champion on the same footing, else
    give it `@challenger`; the reason becomes a tag of the candidate. Returns (alias, reason)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    c = candidate
    client.set_model_version_tag(c.name, c.version, f"vqpipe.eval.{c.metric}", f"{c.value:.6g}")
    client.set_model_version_tag(c.name, c.version, FOOTING_TAG, c.footing)
    try:
        champion = client.get_model_version_by_alias(c.name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None:
        return _decide(client, c, True, f"first champion ({c.metric} {c.value:.4g})")
    if str(champion.version) == c.version:
        return _decide(client, c, True, f"already the champion ({c.metric} {c.value:.4g})")
    theirs = None
    if champion.tags.get(FOOTING_TAG) == c.footing and f"vqpipe.eval.{c.metric}" in champion.tags:
        theirs = float(champion.tags[f"vqpipe.eval.{c.metric}"])
    elif c.incomparable is not None and (verdict := c.incomparable(champion.tags)) is not None:
        reason, promoted = verdict
        return _decide(client, c, promoted, f"{reason} (champion was v{champion.version})")
    elif c.remeasure is not None:
        theirs = c.remeasure(f"models:/{c.name}/{champion.version}")
        if theirs is not None:  # the champion's figure on this footing, for the next comparison
            client.set_model_version_tag(c.name, champion.version, f"vqpipe.eval.{c.metric}", f"{theirs:.6g}")
            client.set_model_version_tag(c.name, champion.version, FOOTING_TAG, c.footing)
    if theirs is None:
        return _decide(client, c, False, f"champion v{champion.version} was measured on other data and cannot be again")
    better = c.value > theirs if c.higher_is_better else c.value < theirs
    relation = (">" if c.higher_is_better else "<") if better else ("<=" if c.higher_is_better else ">=")
    reason = f"{c.metric} {c.value:.4g} {relation} champion v{champion.version}'s {theirs:.4g} on {c.footing}"
    return _decide(client, c, better, reason)


def _decide(client, c: Candidate, promoted: bool, reason: str) -> tuple[str, str]:
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(c.name, alias, c.version)
    client.set_model_version_tag(c.name, c.version, REASON_TAG, f"{alias}: {reason}")
    log.info("%s version %s is @%s: %s", c.name, c.version, alias, reason)
    return alias, reason


def split_digest(shards: Path) -> str:
    """What a tokenizer is measured on: the validation shards' sha256s, hashed."""
    manifest = read_manifest(shards)
    sums = sorted(s["sha256"] for s in manifest["shards"] if s["split"] == "val")
    return hashlib.sha256("".join(sums).encode()).hexdigest()[:16]


def tokens_digest(val_parts: list, infos: list) -> str:
    """What a prior is measured on: the validation token parts (from their footers)."""
    return parts_identity(val_parts, infos)[:16]


def image_metric(spec: str, shards: Path, metric: str, limit: int | None, batch_size: int, root: Path) -> float:
    """PSNR or SSIM of the tokenizer `spec` (an MLflow URI or export) on the validation split,
    over the first `limit` images, of the uint8-rounded reconstructions (as evaluate measures)."""
    with tempfile.TemporaryDirectory(prefix="vqpipe-champion-") as tmp:
        tokenizer = Tokenizer.load(fetch_export(spec, Path(tmp) / "t", "tokenizer", root))
    score = {"psnr": psnr, "ssim": ssim}[metric]
    total = count = 0.0
    for raw, _, _ in split_batches(shards, "val", batch_size, limit=limit):
        images = to_float(raw)
        total += score(as_uint8_images(tokenizer.reconstruct(images)), images).sum().item()
        count += len(images)
    return total / count


def prior_bits(spec: str, tokens_val: list, tokenizer: Tokenizer, batch_size: int, root: Path) -> float | None:
    """Bits per token of the prior `spec` on validation token parts of `tokenizer` (None when
    it models other tokens)."""
    with tempfile.TemporaryDirectory(prefix="vqpipe-champion-") as tmp:
        try:
            prior, _ = load_prior(fetch_export(spec, Path(tmp) / "p", "prior", root), tokenizer=tokenizer)
        except ValueError:
            return None
    bits = PriorBits(prior)
    text = prior.conditioning == "text"
    length = prior.null_condition(1).shape[-1] if text else 0
    for batch in token_io.iter_token_batches(tokens_val, batch_size, captions=text):
        if text:
            condition = caption_matrix(batch.captions, length)
        else:
            condition = torch.from_numpy(batch.labels) if prior.num_classes else None
        bits.add(torch.from_numpy(batch.tokens), condition)
    return bits.bits


def prior_kind(export: str | Path) -> str:
    """ar | maskgit: the kind of the prior exported at `export`."""
    meta = json.loads((Path(export) / "config.json").read_text())
    return meta.get("model", {}).get("kind", "ar")


def prior_condition(export: str | Path) -> str:
    """text | class | none: what the prior exported at `export` samples given."""
    meta = json.loads((Path(export) / "config.json").read_text())
    if "text" in meta:
        return "text"
    model = meta["model"] if "model" in meta else meta["hierarchical"]["top"]
    return "class" if model.get("num_classes") else "none"


def promote_models(params, paths, metrics: dict) -> dict[str, tuple[str, str]]:
    """After evaluate: the project's tokenizer and prior versions against their champions
    (module doc); {"tokenizer": (alias, reason), "prior": ...} for those registered."""
    cfg, out = params.evaluate, {}
    if not cfg.promote:
        return out
    tokenizer = Tokenizer.load(paths.tokenizer)
    tok_name = params.train_tokenizer.registered_model
    tok_version = version_of(tok_name, paths.tokenizer) if tok_name else None
    if tok_version is not None:
        metric = cfg.promote_tokenizer_on
        out["tokenizer"] = promote(
            Candidate(
                tok_name,
                tok_version,
                metric,
                float(metrics[metric]),
                f"val split {split_digest(paths.shards)}, {metrics['val_images']} images",
                higher_is_better=True,
                remeasure=lambda spec: image_metric(
                    spec, paths.shards, metric, cfg.max_images, cfg.batch_size, paths.root
                ),
            )
        )
    prior_name = params.train_prior.registered_model
    prior_version = version_of(prior_name, paths.prior) if prior_name else None
    if prior_version is not None:
        val_parts = token_io.split_parts(paths.tokens, "val")
        infos = token_io.check_parts(val_parts, tokenizer.fingerprint)
        kind, condition = prior_kind(paths.prior), prior_condition(paths.prior)

        def incomparable(tags: dict) -> tuple[str, bool] | None:
            their_condition = tags.get(PRIOR_CONDITION_TAG, "class")
            if (their_condition == "text") != (condition == "text"):
                return (
                    f"the champion is a {their_condition}-conditional prior and this a {condition}-conditional one "
                    "(bits given a caption and given a class measure different things)",
                    False,
                )
            theirs = tags.get(PRIOR_KIND_TAG, "ar")
            if theirs != kind:
                names = {"ar": "an AR", "maskgit": "a MaskGIT"}
                return (
                    f"the champion is {names.get(theirs, theirs)} prior and this {names.get(kind, kind)} one (their "
                    "bits per token measure different things; compare them on evaluate's sample metrics)",
                    False,
                )
            if tags.get(FINGERPRINT_TAG) == tokenizer.fingerprint:
                return None  # the same tokens: measured again on these
            follows = out.get("tokenizer", ("",))[0] == CHAMPION
            what = "the champion prior models another tokenizer's tokens (bits per token do not compare)"
            if follows:
                return f"{what}; this prior's tokenizer is the champion tokenizer", True
            return f"{what}; this prior's tokenizer is not the champion tokenizer", False

        out["prior"] = promote(
            Candidate(
                prior_name,
                prior_version,
                "prior_bits_per_token",
                float(metrics["prior_bits_per_token"]),
                ("masked bits, " if kind == "maskgit" else "")
                + f"tokenizer {tokenizer.fingerprint[:16]}, val tokens {tokens_digest(val_parts, infos)}",
                higher_is_better=False,
                remeasure=lambda spec: prior_bits(spec, val_parts, tokenizer, cfg.batch_size, paths.root),
                incomparable=incomparable,
            )
        )
    return out
