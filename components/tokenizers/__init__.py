"""Tokenizer architectures and the standalone Tokenizer API."""

from components.tokenizers.tokenizer import Tokenizer, build_model, export_config, save_export, state_fingerprint
from components.tokenizers.vqvae import VQVAE, VQVAEOutput

__all__ = ["Tokenizer", "VQVAE", "VQVAEOutput", "build_model", "export_config", "save_export", "state_fingerprint"]
