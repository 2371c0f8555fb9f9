"""The sections of `params.yaml` as typed settings: one pydantic model per stage, validated
when made, each field with its default (the only one: modules take these configs).

Each setting is an outcome (it changes what its stage produces: a DVC param, listed in
dvc.yaml) or a runtime setting (`runtime(...)`: how fast, where or how verbosely the stage runs;
not tracked, so changing it reruns nothing). `components.config` loads and checks them whole.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.quantizers import QUANTIZERS, QuantizerConfig

if TYPE_CHECKING:
    import torch

BUILTIN_SOURCES = ("shapes",)
SOURCE_KINDS = ("builtin", "folder", "webdataset", "parquet")
Device = str  # "auto", "cpu", "cuda", "cuda:N"


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError(f"must be a power of two (1, 2, 4, 8, ...), got {value}")
    return value


def _group_norm_friendly(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (GroupNorm uses 8 groups), got {value}")
    return value


PowerOfTwo = Annotated[int, AfterValidator(_power_of_two)]
# Every seed reaches torch.manual_seed (which takes up to 2**64 - 1) and numpy's generators
# (which take no negative seed); larger ones passed validation and crashed in training.
Seed = Annotated[int, Field(ge=0, lt=2**63)]
# A convolution width the blocks' GroupNorm (8 groups) divides.
GroupNormWidth = Annotated[int, AfterValidator(_group_norm_friendly)]


def runtime(default: Any, **constraints: Any) -> Any:
    """A field that only changes how fast, where or how verbosely a stage runs, never what it
    produces: not a DVC param (see `outcome_params`)."""
    return Field(default, json_schema_extra={"runtime": True}, **constraints)


def is_runtime(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("runtime"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("device", mode="after", check_fields=False)
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device {value!r} (allowed: auto, cpu, cuda, cuda:N)")


class SamplingOptions(BaseModel):
    """How tokens are drawn. Invalid values fail when the options are made, naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Divides the logits: < 1 sharper, > 1 more varied.
    temperature: float = Field(1.0, gt=0)
    # Draw only among the k likeliest codes (None: all).
    top_k: int | None = Field(None, ge=1)
    # Nucleus sampling: the smallest set of likeliest codes holding top_p of the probability.
    top_p: float | None = Field(None, gt=0, le=1)
    # Classifier-free guidance for a conditional prior, u + s (c - u): 1 = plain conditional
    # sampling, 0 = unconditional, > 1 stronger class evidence.
    guidance_scale: float = Field(1.0, ge=0)
    # constant: that scale for every token; linear: ramped from 1 at the first token (an AR
    # prior) or decoding step (MaskGIT) to guidance_scale at the last.
    guidance_schedule: Literal["constant", "linear"] = "constant"
    # MaskGIT priors: parallel decoding steps (every position is filled after this many).
    decode_steps: int = Field(10, ge=1)
    # MaskGIT priors: Gumbel noise on the confidences that choose which tokens to keep, times
    # (1 - progress): early choices are varied, late ones the most confident (0: none).
    choice_temperature: float = Field(4.5, ge=0)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def scale_at(self, step: int, steps: int) -> float:
        """The guidance scale at token or decoding step `step` (0-based) of `steps`."""
        if self.guidance_schedule == "constant" or steps <= 1:
            return self.guidance_scale
        return 1.0 + (self.guidance_scale - 1.0) * step / (steps - 1)

    def check(self, model, labels: torch.Tensor | None) -> None:
        """ValueError when these options cannot sample `model` for `labels` (classes, or a text
        prior's caption ids), before any work."""
        if getattr(model, "conditioning", None) == "text":
            if self.guided and labels is None:
                raise ValueError("classifier-free guidance needs the captions to sample")
            if labels is not None:  # raises naming the problem
                getattr(model, "top", model).cond_tokens(labels, len(labels), labels.device)
            return
        if self.guided and not model.num_classes:
            raise ValueError(
                f"guidance_scale {self.guidance_scale} needs a class-conditional prior; this one is unconditional"
            )
        if self.guided and labels is None:
            raise ValueError("classifier-free guidance needs the classes to sample")
        if labels is None or not len(labels):
            return
        if not model.num_classes:
            if (labels >= 0).any():
                raise ValueError("class labels given, but the prior is unconditional")
            return
        bad = labels[(labels >= model.num_classes) | (labels < -1)]
        if len(bad):
            raise ValueError(f"class {int(bad[0])} out of range [0, {model.num_classes})")


class ParquetOptions(_Section):
    """Only read with a `parquet:` source: which columns hold what (Hugging Face's layout)."""

    # Encoded image bytes, or a {bytes, path} struct (null bytes: read `path`, relative to the file).
    image_column: str = "image"
    # Integer or string classes; null: unlabelled. Names from the ClassLabel metadata when present.
    label_column: str | None = None
    # A string column kept as each sample's caption; null: none.
    caption_column: str | None = None


class ReadLimitsOptions(_Section):
    """Bounds on reading one input (components/data/limits.py): an input over a size limit is one
    reject naming the limit, an input over a time limit one unreadable shard, retried."""

    # Images whose header declares more pixels are rejected undecoded (Pillow's default limit).
    max_image_pixels: int = Field(DEFAULT_LIMITS.max_image_pixels, ge=1)
    # A tar member (one field of a sample) or a folder's file over this size is rejected unread.
    max_member_bytes: int = Field(DEFAULT_LIMITS.max_member_bytes, ge=1)
    max_file_bytes: int = Field(DEFAULT_LIMITS.max_file_bytes, ge=1)
    # A pipe: command that writes nothing for this long is killed (seconds; 0: no limit).
    pipe_idle_timeout: float = runtime(DEFAULT_LIMITS.pipe_idle_timeout, ge=0)
    # Reading one input shard may take this long before it is abandoned and retried (0: no limit).
    shard_timeout: float = runtime(DEFAULT_LIMITS.shard_timeout, ge=0)
    # Run pipe: lines found inside @FILE lists (a list file is data; its pipe: lines are commands).
    allow_pipe_in_lists: bool = runtime(DEFAULT_LIMITS.allow_pipe_in_lists)

    def read_limits(self) -> ReadLimits:
        return ReadLimits(**self.model_dump())


class ShardConfig(_Section):
    # builtin:shapes | folder:PATH | webdataset:SPEC (tar shards) | parquet:SPEC (docs/corpora.md)
    source: str = "builtin:shapes"
    # Only for builtin sources; the others take every image they find.
    num_images: int = Field(16000, ge=1)
    image_size: int = Field(32, ge=8)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    samples_per_shard: int = Field(1000, ge=1)
    # How the shards store images: png (lossless) or jpg (quality 95, about 5x smaller for photos).
    image_format: Literal["png", "jpg"] = "png"
    # Captions longer than this many characters are cut (and counted in the manifest).
    max_caption_chars: int = Field(2048, ge=1)
    parquet: ParquetOptions = ParquetOptions()
    limits: ReadLimitsOptions = ReadLimitsOptions()
    seed: Seed = 0
    # The stage fails when more than this share of the input shards or files cannot be read
    # (each is tried 1 + `retries` times and listed with its error in the manifest).
    max_unreadable: float = runtime(0.01, ge=0, le=1)
    retries: int = runtime(2, ge=0)
    # Below this many inputs Ray's start-up costs more than it saves (the shards are
    # byte-identical either way). A tar shard of a webdataset source counts as samples_per_shard.
    ray_min_inputs: int = runtime(10000, ge=1)
    # Ray tasks writing shards at once; 0: one per core.
    ray_tasks: int = runtime(0, ge=0)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        kind, sep, arg = value.partition(":")
        allowed = f"builtin:{'|'.join(BUILTIN_SOURCES)}, folder:PATH, webdataset:SPEC, parquet:SPEC"
        if not sep or kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source {value!r} (allowed: {allowed})")
        if kind == "builtin" and arg not in BUILTIN_SOURCES:
            raise ValueError(f"unknown builtin source {arg!r} (allowed: {', '.join(BUILTIN_SOURCES)})")
        if kind != "builtin" and not arg.strip():
            raise ValueError(f"{kind} source needs a path or pattern: {kind}:SPEC")
        return value


def _pick_quantizer(value: Any) -> QuantizerConfig:
    if isinstance(value, QuantizerConfig):
        return value
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"needs a mapping with a `type` (allowed: {', '.join(sorted(QUANTIZERS))})")
    kind = value["type"]
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer type {kind!r} (allowed: {', '.join(sorted(QUANTIZERS))})")
    return QUANTIZERS[kind].model_validate(value)


class VQVAE2Options(_Section):
    """Only read when `arch: vqvae2`."""

    # The top tier's grid is the bottom grid divided by this.
    top_downsample: PowerOfTwo = Field(2, ge=2)
    # The top tier's quantizer; null: the same settings as `quantizer` (the bottom tier's).
    top_quantizer: SerializeAsAny[QuantizerConfig] | None = None

    @field_validator("top_quantizer", mode="before")
    @classmethod
    def _pick(cls, value: Any) -> QuantizerConfig | None:
        return None if value is None else _pick_quantizer(value)


class VQGANOptions(_Section):
    """Only read when `arch: vqgan`."""

    # Steps before the discriminator trains and the adversarial term joins the loss.
    disc_start: int = Field(500, ge=0)
    # Factor on the adaptive adversarial weight.
    disc_weight: float = Field(0.8, ge=0)
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_channels: GroupNormWidth = Field(64, ge=8)
    # Stride-2 layers of the PatchGAN; images need at least 2^(layers+2) pixels a side.
    disc_layers: int = Field(3, ge=1)
    # null: the generator's lr.
    disc_lr: float | None = Field(None, gt=0)
    adaptive_weight_max: float = Field(1e4, gt=0)
    lecam_weight: float = Field(0.0, ge=0)
    lecam_decay: float = Field(0.999, gt=0, lt=1)


def default_ch_mult(levels: int) -> tuple[int, ...]:
    """LlamaGen's width multipliers for `levels` resolutions: 1 at full size, ending 2, 2, 4
    (f4: 1, 2, 4; f8: 1, 2, 2, 4; f16: 1, 1, 2, 2, 4)."""
    if levels <= 1:
        return (1,)
    return (1, *([1] * levels + [2, 2, 4])[-(levels - 1) :])


class TamingOptions(_Section):
    """Only read when `network: taming`: taming-transformers' and LlamaGen's encoder/decoder
    (components/tokenizers/taming.py). `channels` is its base width and `num_res_blocks` the
    ResNet blocks per level (the decoder has one more)."""

    # Width multiplier of each resolution level; len(ch_mult) - 1 = log2(downsample).
    # null: LlamaGen's for the downsampling (f8: [1, 2, 2, 4], f16: [1, 1, 2, 2, 4]).
    ch_mult: tuple[Annotated[int, Field(ge=1)], ...] | None = None
    # Feature-map sides (pixels) whose ResNet blocks are each followed by self-attention.
    # null: the coarsest level's (LlamaGen; 16 at 256 px with f16); []: none.
    attn_resolutions: tuple[Annotated[int, Field(ge=1)], ...] | None = None
    # Self-attention between the two ResNet blocks of the middle.
    mid_attention: bool = True
    # Width of the encoder's output and the decoder's input; a 1x1 conv maps it to latent_dim.
    z_channels: int = Field(256, ge=1)
    # GroupNorm groups: 32 as both references; every level's width must be a multiple.
    norm_groups: int = Field(32, ge=1)

    def resolved_ch_mult(self, downsample: int) -> tuple[int, ...]:
        return self.ch_mult if self.ch_mult is not None else default_ch_mult(int(math.log2(downsample)) + 1)

    def resolved_attn_resolutions(self, image_size: int, downsample: int) -> tuple[int, ...]:
        return self.attn_resolutions if self.attn_resolutions is not None else (image_size // downsample,)


def training_settings(cfg: BaseModel, resumable: tuple[str, ...], unused: frozenset[str] = frozenset()) -> dict:
    """What a checkpoint must agree on to be resumed: every outcome setting but `resumable`
    (what a resumed run may change) and the `unused` option groups."""
    model = type(cfg)
    return {
        k: v
        for k, v in cfg.model_dump(mode="json").items()
        if not is_runtime(model, k) and k not in resumable and k not in unused
    }


class TrainTokenizerConfig(_Section):
    arch: Literal["vqvae", "vqvae2", "vqgan"] = "vqvae"
    # compact: small residual network, widths doubling per downsampling up to 4x (the CPU
    # default); taming: taming-transformers' / LlamaGen's, with the `taming` options.
    network: Literal["compact", "taming"] = "compact"
    # Width of the first stage (compact: doubles at each downsampling, up to 4x; taming: times ch_mult).
    channels: GroupNormWidth = Field(32, ge=8)
    # Per resolution (compact: the bottleneck always has one; taming: at least 1).
    num_res_blocks: int = Field(0, ge=0)
    # Spatial downsampling factor of the encoder: a power of two; image_size / downsample = grid.
    downsample: PowerOfTwo = Field(4, ge=1)
    latent_dim: int = Field(32, ge=1)
    # SerializeAsAny: dumps (MLflow params, the export's config.json) carry the chosen type's
    # options, not only the base class's `type`.
    quantizer: SerializeAsAny[QuantizerConfig] = Field(default_factory=lambda: QUANTIZERS["vq"]())
    vqvae2: VQVAE2Options = VQVAE2Options()
    vqgan: VQGANOptions = VQGANOptions()
    taming: TamingOptions = TamingOptions()
    recon_loss: Literal["l2", "l1"] = "l2"
    # LPIPS (VGG16) weight; > 0 needs `perceptual_weights`, a local file (never downloaded).
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_weights: str | None = None
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Adam's (beta1, beta2); null: (0.5, 0.9) for vqgan as taming-transformers, else (0.9, 0.999).
    # LlamaGen trains with (0.9, 0.95).
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] | None = None
    # constant, or cosine decay to min_lr_ratio x lr at `steps`; both after a linear warmup.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # Gradients clipped to this global norm (generator and discriminator apart); null: never.
    grad_clip: float | None = Field(None, gt=0)
    # An exponential moving average of the weights with this decay (warmed up as
    # min(decay, (1 + n) / (10 + n)) after n updates) is what is validated and exported; null: off.
    weight_ema_decay: float | None = Field(None, gt=0, lt=1)
    # Micro-batches per optimizer step: batch_size is split in this many, their gradients summed
    # (memory of one micro-batch); EMA codebooks and dead-code counters move once per step.
    grad_accum_steps: int = Field(1, ge=1)
    # bf16 autocast for the encoder/decoder (the quantizer always runs in fp32). auto: bf16
    # where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Compile the model with torch.compile (minutes of compilation, then faster steps).
    compile: bool = runtime(False)
    # Samples held for shuffling, shared by the lanes (memory does not grow with them).
    shuffle_buffer: int = Field(1000, ge=0)
    # The training data's fixed partition (components/data/lanes.py): the batches and their
    # order depend on it, never on the worker counts below. Up to lanes processes (DDP
    # workers x loader workers) each read their own lanes; more share lanes, reading more.
    lanes: int = Field(8, ge=1)
    # DataLoader processes decoding shards, per DDP worker; 0 decodes in the training
    # process: best where training already uses every core (a CPU-only laptop); on a GPU
    # machine give it several.
    loader_workers: int = runtime(0, ge=0)
    # DDP workers: 1 trains in the stage's process; N > 1 on N Ray Train workers, each taking
    # batch_size / N images per step.
    ddp_workers: int = runtime(1, ge=1)
    # DDP workers on GPUs: auto when the Ray cluster has `ddp_workers` GPUs.
    use_gpu: bool | Literal["auto"] = runtime("auto")
    val_every: int = runtime(200, ge=1)
    log_every: int = runtime(25, ge=1)
    # A full training state every this many steps (and at the end), in `checkpoint_dir`.
    checkpoint_every: int = runtime(200, ge=1)
    # Outside DVC's outs on purpose: see docs/operations.md, "Checkpoints and resuming".
    checkpoint_dir: str = runtime("checkpoints/train_tokenizer")
    # Resume an interrupted run from its checkpoint; false always starts over.
    resume: bool = runtime(True)
    # Each trained tokenizer becomes a version of this MLflow registered model, so that
    # `vqpipe tokenize --tokenizer models:/NAME@ALIAS` finds it; null registers nothing.
    registered_model: str | None = runtime("vqpipe-tokenizer")
    seed: Seed = 0
    device: Device = runtime("auto")

    # Outcomes a resumed run may change: how long it trains and its precision. grad_accum_steps
    # too: the batches and their order do not depend on it.
    RESUMABLE: ClassVar[tuple[str, ...]] = ("steps", "precision", "grad_accum_steps")

    @field_validator("quantizer", mode="before")
    @classmethod
    def _pick_quantizer(cls, value: Any) -> QuantizerConfig:
        return _pick_quantizer(value)

    @property
    def top_quantizer(self) -> QuantizerConfig:
        """The vqvae2 top tier's quantizer (the bottom's settings unless given)."""
        return self.vqvae2.top_quantizer or self.quantizer

    def training_settings(self) -> dict:
        """What a checkpoint must agree on to be resumed (the options of the architectures not
        in use aside)."""
        unused = frozenset({"vqvae2", "vqgan"} - {self.arch}) | ({"taming"} if self.network != "taming" else set())
        return training_settings(self, self.RESUMABLE, unused)

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.downsample))

    @property
    def betas(self) -> tuple[float, float]:
        if self.adam_betas is not None:
            return self.adam_betas
        return (0.5, 0.9) if self.arch == "vqgan" else (0.9, 0.999)


class TokenizeConfig(_Section):
    # Images per forward pass; every image is encoded on its own, so parts do not depend on it.
    batch_size: int = runtime(256, ge=1)
    # Ray actors tokenizing shards (one part per shard, whichever actor makes it).
    actors: int = runtime(2, ge=1)
    cpus_per_actor: float = runtime(1.0, gt=0)
    # Set to 1 (or a fraction) to place each actor on a GPU of the Ray cluster.
    gpus_per_actor: float = runtime(0.0, ge=0)
    device: Device = runtime("auto")


class ExportConfig(_Section):
    """The `export` stage: data/tokens -> data/lm, what a language model trains on
    (components/data/lm_export.py documents the vocabulary; `vqpipe export` does the same for any
    token output)."""

    # bin: packed ids per split (train.bin, val.bin: nanoGPT's, read with np.memmap);
    # parquet: rows of input_ids, key, label, caption (load_dataset("parquet", ...)).
    format: Literal["bin", "parquet"] = "bin"
    # Put each image's caption ids before it ([caption] boi [image] eoi).
    captions: bool = True
    # A Hugging Face `tokenizers` JSON file (a local path) for the captions; null: UTF-8 bytes.
    text_tokenizer: str | None = None
    # Longer captions are cut to this many ids (counted in meta.json's caption_counts).
    max_caption_tokens: int = Field(256, ge=1)
    # Rows converted at once (memory holds this many, never a part).
    batch_rows: int = runtime(4096, ge=1)


class TextConditionOptions(_Section):
    """Only read when `train_prior.condition: text`."""

    # Caption slots before the image: UTF-8 bytes, longer captions cut (the built-in shapes'
    # are at most 48 bytes).
    max_caption_tokens: int = Field(64, ge=1, le=4096)
    # Rows whose caption is one of these (exactly) are left out of training: combinations the
    # prior never sees, which `evaluate` prompts it with (prompt consistency).
    held_out_captions: list[str] = []

    @field_validator("held_out_captions")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("held_out_captions lists a caption twice")
        if any(not c.strip() for c in value):
            raise ValueError("held_out_captions holds an empty caption (the unconditional input)")
        return value


class TrainPriorConfig(_Section):
    # ar: a causal transformer, token by token in raster order; maskgit: a bidirectional one
    # trained on masked tokens, sampled in `sampling.decode_steps` parallel steps (one token tier).
    kind: Literal["ar", "maskgit"] = "ar"
    # What the prior samples given: class (the tokens' labels, when they have them), text (each
    # image's caption before it, DALL-E's layout: `text` options) or none.
    condition: Literal["class", "text", "none"] = "class"
    text: TextConditionOptions = TextConditionOptions()
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    # The output head shares the code embeddings (fewer parameters; often better on small data).
    tie_weights: bool = False
    # Training replaces a sample's class by the null token (its caption by the empty one) with
    # this probability, so one model samples conditionally, unconditionally and with
    # classifier-free guidance.
    label_dropout: float = Field(0.1, ge=0, le=1)
    # bf16 autocast where native (auto: CUDA, AVX512-BF16 CPUs); fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Each trained prior (with its tokenizer) becomes a version of this MLflow registered
    # model: `vqpipe sample --prior models:/NAME@ALIAS`; null registers nothing.
    registered_model: str | None = runtime("vqpipe-prior")
    # A full training state every this many steps (and at the end), outside DVC's outs.
    checkpoint_every: int = runtime(250, ge=1)
    checkpoint_dir: str = runtime("checkpoints/train_prior")
    resume: bool = runtime(True)
    # DDP workers: 1 trains in the stage's process; N > 1 on N Ray Train workers, each taking
    # batch_size / N sequences of every step's batch.
    ddp_workers: int = runtime(1, ge=1)
    use_gpu: bool | Literal["auto"] = runtime("auto")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    # Token rows shuffled through buffers this large in all as they stream from the parts
    # (memory: this many rows, never the corpus).
    shuffle_buffer: int = Field(10000, ge=0)
    # The token rows' fixed partition: the batches and their order depend on it, never on
    # ddp_workers (components/data/lanes.py).
    lanes: int = Field(8, ge=1)
    # muon: Muon on the transformer blocks' matrices (at muon_lr), AdamW on embeddings, head,
    # norms and biases (at lr); adamw: AdamW on everything (what a params.yaml without the key
    # gets: vqpipe <= 0.11). components/optim.py.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = Field(0.02, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    # An exponential moving average of the weights with this decay (warmed up as
    # min(decay, (1 + n) / (10 + n)) after n updates) is what is validated and exported; null: off.
    weight_ema_decay: float | None = Field(None, gt=0, lt=1)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Validation rows whose bits per token are measured every val_every steps (null: all).
    val_max_rows: int | None = Field(10000, ge=1)
    val_every: int = runtime(250, ge=1)
    log_every: int = runtime(25, ge=1)
    seed: Seed = 0
    device: Device = runtime("auto")

    # Outcomes a resumed run may change: how long it trains and its precision.
    RESUMABLE: ClassVar[tuple[str, ...]] = ("steps", "precision")

    def training_settings(self) -> dict:
        """What a checkpoint must agree on to be resumed (the text options and Muon's rate
        aside unless used)."""
        unused = ({"text"} if self.condition != "text" else set()) | (
            {"muon_lr"} if self.optimizer != "muon" else set()
        )
        return training_settings(self, self.RESUMABLE, frozenset(unused))

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TrainPriorConfig:
        if self.condition == "text" and self.kind != "ar":
            raise ValueError(
                f"condition text needs kind ar: a {self.kind} prior reads one class token, not a caption "
                "(use kind ar, or condition class / none)"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.batch_size % self.ddp_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by ddp_workers ({self.ddp_workers})")
        if self.lanes > self.batch_size:
            raise ValueError(f"lanes ({self.lanes}) must not exceed batch_size ({self.batch_size})")
        return self


class SampleConfig(_Section):
    # Conditional priors sample this many per class (one grid row per class).
    num_per_class: int = Field(8, ge=1)
    # Unconditional priors sample this many in all.
    num_images: int = Field(64, ge=1)
    # Text priors: one grid row of num_per_class images per prompt; empty: the prompts the
    # prior was trained without (train_prior.text.held_out_captions), else unconditional.
    prompts: list[str] = []
    # Temperature, top-k, top-p and guidance: also what `vqpipe sample` draws with by default.
    sampling: SamplingOptions = SamplingOptions()
    # Sequences drawn at once (an outcome: the draws from the seeded generator follow the batches).
    batch_size: int = Field(64, ge=1)
    seed: Seed = 0
    device: Device = runtime("auto")


class EvaluateConfig(_Section):
    batch_size: int = Field(256, ge=1)
    # Cap on validation images reconstructed and compared with samples (None: all of them).
    max_images: int | None = Field(None, ge=1)
    # Images drawn from the prior for FID, precision/recall and class consistency (0: none).
    num_samples: int = Field(512, ge=0)
    # How those samples are drawn.
    sampling: SamplingOptions = SamplingOptions()
    # FID's feature space: a local Inception-v3 weights file (pytorch-fid's FID Inception,
    # safetensors or a state dict; never downloaded). Null: the tokenizer's own encoder,
    # labelled as such (not comparable with published FIDs).
    inception_weights: str | None = None
    # Reconstruction FID (rFID) over the whole validation split is always computed: with the
    # Inception weights above when given, else in a seeded, randomly initialised Inception-v3
    # (labelled; comparable between vqpipe runs only). LPIPS of the reconstructions needs a local
    # LPIPS-VGG16 weights file (components/tokenizers/lpips.py); null: not computed.
    perceptual_weights: str | None = None
    # Also write eval/reconstructions.npz, eval/references.npz (the validation images) and, with
    # num_samples, eval/samples.npz: uint8 NHWC `arr_0`, what the reference evaluation suites
    # (ADM's evaluator) read.
    write_npz: bool = False
    # k of the k-NN balls of precision/recall.
    pr_k: int = Field(3, ge=1)
    # Steps of the small classifier (trained on the validation images) that judges whether a
    # sample shows the class it was drawn for.
    classifier_steps: int = Field(200, ge=1)
    # Text priors: samples drawn per held-out caption for prompt consistency (0: none).
    prompt_samples: int = Field(64, ge=0)
    # MiB of features precision/recall keeps in memory per set; past it they are spilled to a
    # memory-mapped temporary file (the same result, bounded memory).
    feature_memory_mb: int = runtime(1024, ge=1)
    # After evaluating, move the registered tokenizer's and prior's @champion to the new
    # versions when they beat it (else @challenger): the tokenizer on this metric, the prior on
    # bits per token, each measured on the same data (pipelines/registry.py).
    promote: bool = runtime(True)
    promote_tokenizer_on: Literal["psnr", "ssim"] = runtime("psnr")
    seed: Seed = 0
    device: Device = runtime("auto")


class PipelineConfig(_Section):
    """How a pipeline run (`vqpipe run`, a scheduled run) goes around its stages: all runtime,
    none of it changes what a stage produces."""

    # Push the outputs to the DVC remote after a successful run (the project's default remote,
    # a folder outside the workspace, unless `.dvc/config` names another): `vqpipe pull`
    # restores them on another machine or clone.
    push: bool = runtime(True)
    # POSTed a JSON message (flow run, failed stage, error) when a run fails; null: nobody is told.
    notify_url: str | None = runtime(None)

    @field_validator("notify_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value
