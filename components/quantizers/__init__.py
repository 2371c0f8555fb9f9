"""Quantizers, selected by `train_tokenizer.quantizer.type` through the registry."""

from components.quantizers.base import QuantizerOutput, check_finite, usage_stats
from components.quantizers.registry import QUANTIZERS, QuantizerConfig, register
from components.quantizers.vq import VectorQuantizer, VQConfig, nearest_codes

__all__ = [
    "QUANTIZERS",
    "QuantizerConfig",
    "QuantizerOutput",
    "VQConfig",
    "VectorQuantizer",
    "check_finite",
    "nearest_codes",
    "register",
    "usage_stats",
]
