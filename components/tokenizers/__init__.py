"""Tokenizer architectures (VQ-VAE, VQ-VAE-2, VQ-GAN's discriminator and losses) and the
standalone `Tokenizer` API."""

from components.tokenizers.tokenizer import ARCHS, Tokenizer, build_model, export_config, save_export, state_fingerprint
from components.tokenizers.vqvae import VQVAE, TokenizerOutput
from components.tokenizers.vqvae2 import VQVAE2

__all__ = [
    "ARCHS",
    "Tokenizer",
    "TokenizerOutput",
    "VQVAE",
    "VQVAE2",
    "build_model",
    "export_config",
    "save_export",
    "state_fingerprint",
]
