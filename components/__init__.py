"""vqpipe's library: data, quantizers, tokenizers, priors, metrics. Framework-free (torch only)."""

__version__ = "0.12.0"
