"""Typed params: the whole `params.yaml` (`Params`, one section per stage, the sections in
`components/settings.py`), loaded and validated once, before any work.

Every error names the offending key (`train_tokenizer.quantizer.codebook_size`) and what is
allowed there; `ConfigError` carries them all. Stages take these models, never raw dicts.

Each setting is an outcome (it changes what its stage produces: a DVC param, listed in
dvc.yaml) or a runtime setting (`runtime(...)`: how fast, where or how verbosely the stage runs;
not tracked, so changing it reruns nothing). `outcome_params` lists the former; a test keeps
dvc.yaml equal to it. Keys renamed since an earlier version are refused with their new name.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from components.quantizers import QUANTIZERS, QuantizerConfig, options_of, types_with_option
from components.settings import (
    BUILTIN_SOURCES,
    SOURCE_KINDS,
    EvaluateConfig,
    ExportConfig,
    PipelineConfig,
    SampleConfig,
    SamplingOptions,
    ShardConfig,
    TamingOptions,
    TokenizeConfig,
    TrainPriorConfig,
    TrainTokenizerConfig,
    VQGANOptions,
    VQVAE2Options,
    is_runtime,
    runtime,
    training_settings,
)

__all__ = [
    "BUILTIN_SOURCES",
    "RENAMED",
    "SECTIONS",
    "STAGE_SECTIONS",
    "SOURCE_KINDS",
    "ConfigError",
    "EvaluateConfig",
    "ExportConfig",
    "Params",
    "PipelineConfig",
    "SampleConfig",
    "SamplingOptions",
    "ShardConfig",
    "TamingOptions",
    "TokenizeConfig",
    "TrainPriorConfig",
    "TrainTokenizerConfig",
    "VQGANOptions",
    "VQVAE2Options",
    "is_runtime",
    "load_params",
    "outcome_params",
    "parse_params",
    "runtime",
    "training_settings",
]

# Keys of an earlier version -> their name now (CHANGELOG.md). An old key is refused, naming the new one.
RENAMED = {
    "shard.num_workers": "shard.ray_tasks",
    "train_tokenizer.workers": "train_tokenizer.ddp_workers",
    "train_tokenizer.num_workers": "train_tokenizer.loader_workers",
    "tokenize.num_actors": "tokenize.actors",
    "tokenize.num_cpus_per_actor": "tokenize.cpus_per_actor",
    "tokenize.num_gpus_per_actor": "tokenize.gpus_per_actor",
    "train_prior.workers": "train_prior.ddp_workers",
    "sample.temperature": "sample.sampling.temperature",
    "sample.top_k": "sample.sampling.top_k",
    "sample.top_p": "sample.sampling.top_p",
    "sample.cfg_scale": "sample.sampling.guidance_scale",
    "evaluate.sample_temperature": "evaluate.sampling.temperature",
    "evaluate.sample_cfg_scale": "evaluate.sampling.guidance_scale",
}


class ConfigError(ValueError):
    """Invalid params; `problems` is a list of (key, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "params.yaml"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {key}: {msg}" for key, msg in problems)
        super().__init__(f"invalid {source}:\n{lines}")


class Params(BaseModel):
    """The whole `params.yaml`: one section per stage, and `pipeline` for the run around them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard: ShardConfig = ShardConfig()
    train_tokenizer: TrainTokenizerConfig = TrainTokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    export: ExportConfig = ExportConfig()
    train_prior: TrainPriorConfig = TrainPriorConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pipeline: PipelineConfig = PipelineConfig()  # the run around the stages, not a stage

    def relation_problems(self, root: str | Path = ".") -> list[tuple[str, str]]:
        """Constraints between keys (across sections, or between the quantizer and the latent),
        reported under the key to change. Relative weight files are looked for in `root`, the
        project (the folder of its params.yaml), wherever the command runs from."""
        problems = []
        for key, value in (
            ("train_tokenizer.perceptual_weights", self.train_tokenizer.perceptual_weights),
            ("evaluate.perceptual_weights", self.evaluate.perceptual_weights),
            ("evaluate.inception_weights", self.evaluate.inception_weights),
            ("export.text_tokenizer", self.export.text_tokenizer),
        ):
            if value and not (Path(root) / value).is_file():
                problems.append(
                    (key, f"{value} not found in {Path(root).resolve()} (a local file; nothing is downloaded)")
                )
        size, factor = self.shard.image_size, self.train_tokenizer.downsample
        if size % factor:
            allowed = ", ".join(str(2**i) for i in range(size.bit_length()) if size % 2**i == 0)
            problems.append(
                ("train_tokenizer.downsample", f"{factor} does not divide shard.image_size={size} (allowed: {allowed})")
            )
        tok = self.train_tokenizer
        for key, msg in tok.quantizer.latent_problems(tok.latent_dim):
            problems.append((f"train_tokenizer.quantizer.{key}", msg))
        if tok.arch == "vqvae2":
            top = factor * tok.vqvae2.top_downsample
            if size % top:
                problems.append(
                    (
                        "train_tokenizer.vqvae2.top_downsample",
                        f"downsample x top_downsample = {top} does not divide shard.image_size={size}",
                    )
                )
            if tok.vqvae2.top_quantizer is not None:
                for key, msg in tok.vqvae2.top_quantizer.latent_problems(tok.latent_dim):
                    problems.append((f"train_tokenizer.vqvae2.top_quantizer.{key}", msg))
        if tok.arch == "vqgan" and size < 2 ** (tok.vqgan.disc_layers + 2):
            problems.append(
                (
                    "train_tokenizer.vqgan.disc_layers",
                    f"{tok.vqgan.disc_layers} layers need images of at least "
                    f"{2 ** (tok.vqgan.disc_layers + 2)} pixels, shard.image_size is {size}",
                )
            )
        if tok.perceptual_weight > 0:
            if not tok.perceptual_weights:
                problems.append(
                    (
                        "train_tokenizer.perceptual_weights",
                        f"perceptual_weight is {tok.perceptual_weight} but no LPIPS weights file is given "
                        "(a local path; nothing is downloaded)",
                    )
                )
        if tok.batch_size % (tok.ddp_workers * tok.grad_accum_steps):
            problems.append(
                (
                    "train_tokenizer.batch_size",
                    f"{tok.batch_size} does not split evenly over ddp_workers={tok.ddp_workers} "
                    f"x grad_accum_steps={tok.grad_accum_steps}",
                )
            )
        if tok.lanes > tok.batch_size:
            problems.append(
                ("train_tokenizer.lanes", f"{tok.lanes} lanes for batches of {tok.batch_size}: at most one per sample")
            )
        if tok.network == "taming":
            problems += taming_problems(tok, size)
        if self.train_prior.kind == "maskgit" and tok.arch == "vqvae2":
            problems.append(
                (
                    "train_prior.kind",
                    "maskgit models one token tier; vqvae2's two tiers need kind ar (maskgit works with "
                    "arch vqvae and vqgan, with any quantizer, several tokens per position included)",
                )
            )
        problems += self._checkpoint_dir_problems()
        return problems

    def _checkpoint_dir_problems(self) -> list[tuple[str, str]]:
        """Both training stages keep their states in files of the same names: one folder each."""
        tok, prior = Path(self.train_tokenizer.checkpoint_dir), Path(self.train_prior.checkpoint_dir)
        a, b = Path(os.path.normpath(tok)), Path(os.path.normpath(prior))
        if a == b or a in b.parents or b in a.parents:
            return [
                (
                    "train_prior.checkpoint_dir",
                    f"{prior} overlaps train_tokenizer.checkpoint_dir={tok}: the two training stages would "
                    "overwrite each other's checkpoints (give each a folder of its own)",
                )
            ]
        return []


def taming_problems(tok: TrainTokenizerConfig, image_size: int) -> list[tuple[str, str]]:
    """What cannot be built of `network: taming` for `image_size` images, under the key to change."""
    if tok.arch == "vqvae2":
        return [("train_tokenizer.network", "taming works with arch vqvae and vqgan; vqvae2 uses the compact network")]
    problems = []
    opts = tok.taming
    ch_mult = opts.resolved_ch_mult(tok.downsample)
    if len(ch_mult) != tok.num_downsamples + 1:
        problems.append(
            (
                "train_tokenizer.taming.ch_mult",
                f"{list(ch_mult)} has {len(ch_mult)} levels, which downsample by {2 ** (len(ch_mult) - 1)}; "
                f"downsample is {tok.downsample} (give {tok.num_downsamples + 1} multipliers)",
            )
        )
        return problems  # the levels, and so where attention can go, are unknown
    if tok.num_res_blocks < 1:
        problems.append(("train_tokenizer.num_res_blocks", "network taming needs at least 1 block per level"))
    have = [image_size // 2**level for level in range(len(ch_mult))]
    never = [r for r in opts.resolved_attn_resolutions(image_size, tok.downsample) if r not in have]
    if never:
        problems.append(
            (
                "train_tokenizer.taming.attn_resolutions",
                f"{never} never occur: at shard.image_size={image_size} the levels are {have} pixels a side",
            )
        )
    widths = sorted({tok.channels * m for m in ch_mult})
    odd = [w for w in widths if w % opts.norm_groups]
    if odd:
        problems.append(
            (
                "train_tokenizer.taming.norm_groups",
                f"{opts.norm_groups} groups do not divide the widths {odd} (channels x ch_mult)",
            )
        )
    return problems


SECTIONS = tuple(Params.model_fields)
STAGE_SECTIONS = tuple(s for s in SECTIONS if s != "pipeline")  # one per DVC stage


def _loc_to_key(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts) or "<top level>"


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model the unknown key was found in."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        if model is QuantizerConfig:
            return []
    return sorted(getattr(model, "model_fields", {}))


def _quantizer_key_message(loc: tuple, raw: Any) -> str | None:
    """For an unknown key inside a quantizer mapping: the options of its type, and which
    types do take that key (`levels` on a `vq` is most likely meant for `fsq`)."""
    node = raw
    for part in loc[:-1]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    kind = node.get("type") if isinstance(node, dict) else None
    if kind not in QUANTIZERS:
        return None
    msg = f"not an option of quantizer type {kind!r} (its options: {', '.join(options_of(kind))})"
    owners = types_with_option(str(loc[-1]))
    return msg + (f"; {loc[-1]} belongs to type {', '.join(owners)}" if owners else "")


def _problems(err: ValidationError, raw: Any = None) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = _quantizer_key_message(loc, raw) or "unknown key" + (
                f" (allowed: {', '.join(allowed)})" if allowed else ""
            )
        elif e["type"] != "value_error" and "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((_loc_to_key(loc), msg))
    return problems


_ABSENT = object()


def renamed_keys(raw: dict) -> list[tuple[str, str]]:
    """(old key, message naming its new one) for every key of `raw` renamed since an earlier version."""
    problems = []
    for old, new in RENAMED.items():
        node: Any = raw
        for part in old.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            problems.append((old, f"renamed to {new} (see CHANGELOG.md); move its value there"))
    return problems


def outcome_params(section: str) -> list[str]:
    """The keys of `section` that change what its stage produces, as dvc.yaml lists them: a
    nested group whole, unless it holds runtime settings (then its outcome keys one by one)."""
    return _outcome_keys(Params.model_fields[section].annotation, section)


def _outcome_keys(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if is_runtime(model, name):
            continue
        sub = field.annotation
        nested = isinstance(sub, type) and issubclass(sub, BaseModel) and not issubclass(sub, QuantizerConfig)
        if nested and any(is_runtime(sub, n) for n in sub.model_fields):
            keys += _outcome_keys(sub, f"{prefix}.{name}")
        else:
            keys.append(f"{prefix}.{name}")
    return keys


def parse_params(raw: Any, source: str = "params.yaml", root: str | Path = ".") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("<top level>", f"must be a mapping of sections ({', '.join(SECTIONS)})")], source)
    renamed = renamed_keys(raw)
    if renamed:
        raise ConfigError(renamed, source)
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_problems(err, raw), source) from None
    problems = params.relation_problems(root)
    if problems:
        raise ConfigError(problems, source)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    silently, so a params.yaml edited in two places would run with only one of the edits)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; ConfigError when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("<file>", f"{path} not found")], str(path))
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError([("<file>", f"not valid YAML: {err}")], str(path)) from None


def merges_into(old: Any, new: Any) -> bool:
    """Whether a profile's value merges into params' value key by key (both mappings) rather
    than replacing it (any other value, and a quantizer: a mapping with a `type`, chosen whole)."""
    return isinstance(new, dict) and isinstance(old, dict) and "type" not in new


def overlay(node: dict, profile: dict) -> None:
    """Put a profile's values into the params mapping `node`, in place (see `merges_into`)."""
    for key, value in profile.items():
        if merges_into(node.get(key), value):
            overlay(node[key], value)
        else:
            node[key] = value


def merge_profile(base: dict, profile: dict) -> dict:
    """`base` params with a profile's values over them (a new mapping; `base` is unchanged)."""
    merged = copy.deepcopy(base)
    overlay(merged, profile)
    return merged


def read_profile(path: str | Path) -> dict:
    """A profile file: a mapping of params sections; ConfigError otherwise."""
    profile = read_yaml(path)
    if not isinstance(profile, dict):
        raise ConfigError([("<top level>", "a profile is a mapping of sections")], str(path))
    return profile


def load_params(path: str | Path = "params.yaml", profile: str | Path | None = None) -> Params:
    """Read and validate a params file, with a profile's values over it when one is given;
    raises ConfigError naming every bad key."""
    raw = read_yaml(path)
    root = Path(path).parent
    if profile is None:
        return parse_params(raw, str(path), root)
    return parse_params(merge_profile(raw or {}, read_profile(profile)), f"{path} with profile {profile}", root)
