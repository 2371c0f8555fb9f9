"""Autoregressive priors over tokens and sampling from them."""

from components.priors.export import load_prior, save_prior
from components.priors.sampling import filter_logits, sample
from components.priors.transformer import PriorConfig, TransformerPrior

__all__ = ["PriorConfig", "TransformerPrior", "filter_logits", "load_prior", "sample", "save_prior"]
