"""models-from-code source of the tokenizer's MLflow pyfunc model (see `pipelines.serving`).

predict(images) -> tokens. `images`: a uint8 array (n, H, W, 3), a float array (n, 3, H, W) in
[0, 1], or a DataFrame whose `image` column holds encoded image files (PNG, JPEG, ...). Tokens:
int64 (n, h, w) (product and residual codes: (n, h, w, m)); a two-tier (VQ-VAE-2) tokenizer
gives {tier: tokens}. Images are encoded `batch_size` at a time (a param; default 64).
"""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.tokenizers import Tokenizer

BATCH = 64


def images_tensor(model_input) -> torch.Tensor:
    """(n, 3, H, W) float in [0, 1] from what `predict` accepts; ValueError naming what it got."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"a DataFrame needs an `image` column of encoded images, got {list(model_input.columns)}")
        arrays = [np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")) for raw in model_input["image"]]
        model_input = np.stack(arrays)
    array = np.asarray(model_input)
    if array.ndim != 4:
        raise ValueError(f"expected a batch of images (n, H, W, 3) or (n, 3, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (n, H, W, 3), got shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0
    if array.shape[1] != 3:
        raise ValueError(f"float images must be (n, 3, H, W) in [0, 1], got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class TokenizerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.tokenizer = Tokenizer.load(context.artifacts["export"])

    def predict(self, context, model_input, params=None):
        images = images_tensor(model_input)
        batch = int((params or {}).get("batch_size") or BATCH)
        parts = [self.tokenizer.encode(images[i : i + batch]) for i in range(0, len(images), batch)]
        if isinstance(parts[0], dict):
            return {tier: torch.cat([p[tier] for p in parts]).cpu().numpy() for tier in parts[0]}
        return torch.cat(parts).cpu().numpy()


mlflow.models.set_model(TokenizerModel())
