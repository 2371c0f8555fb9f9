"""Quantizers, selected by `train_tokenizer.quantizer.type` through the registry.

Every module takes (b, h, w, d) or (b, n, d) and returns a `QuantizerOutput`; see `base.py`
for the whole interface.
"""

from components.quantizers.base import QuantizerOutput, check_finite, deferred_updates, index_stats, usage_stats
from components.quantizers.fsq import FSQ, FSQConfig
from components.quantizers.gumbel import GumbelConfig, GumbelQuantizer
from components.quantizers.lfq import LFQ, LFQConfig
from components.quantizers.product import ProductConfig, ProductQuantizer
from components.quantizers.registry import QUANTIZERS, QuantizerConfig, options_of, register, types_with_option
from components.quantizers.residual import ResidualConfig, ResidualQuantizer
from components.quantizers.vq import VectorQuantizer, VQConfig, VQOptions, kmeans, nearest_codes

__all__ = [
    "FSQ",
    "FSQConfig",
    "GumbelConfig",
    "GumbelQuantizer",
    "LFQ",
    "LFQConfig",
    "ProductConfig",
    "ProductQuantizer",
    "QUANTIZERS",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualConfig",
    "ResidualQuantizer",
    "VQConfig",
    "VQOptions",
    "VectorQuantizer",
    "check_finite",
    "deferred_updates",
    "index_stats",
    "kmeans",
    "nearest_codes",
    "options_of",
    "register",
    "types_with_option",
    "usage_stats",
]
