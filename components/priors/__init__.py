"""Priors over tokens (autoregressive and MaskGIT) and sampling from them."""

from components.config import SamplingOptions
from components.priors.export import PriorMismatch, build_prior, load_prior, save_prior
from components.priors.maskgit import MaskGITPrior
from components.priors.sampling import Sampler, filter_logits, image_batches, sample, sample_images
from components.priors.transformer import HierarchicalPrior, PriorConfig, TransformerPrior

__all__ = [
    "HierarchicalPrior",
    "MaskGITPrior",
    "PriorConfig",
    "PriorMismatch",
    "Sampler",
    "SamplingOptions",
    "TransformerPrior",
    "build_prior",
    "filter_logits",
    "image_batches",
    "load_prior",
    "sample",
    "sample_images",
    "save_prior",
]
