"""models-from-code source of the prior's MLflow pyfunc model (see `pipelines.serving`); the
prior's tokenizer travels in the same model.

predict(rows, params) -> one sample per row. `rows`: a DataFrame whose optional `class` column
names each row's class (an id or a class name; empty: unconditional), or, for a text-conditional
prior, whose `prompt` column holds each row's prompt (empty: unconditional); or an int array of
class ids, or an int n for n unconditional samples. params: temperature, top_k, top_p,
guidance_scale, guidance_schedule, decode_steps and choice_temperature (MaskGIT priors) (as
`vqpipe sample`), seed, and output: "tokens" (int64 (n, L), the default) or
"images" (uint8 (n, H, W, 3)).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

from components.config import SamplingOptions
from components.priors.sampling import Sampler, sample_images
from pipelines.sample import load_models, prompt_condition, resolve_class

BATCH = 64


class PriorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.models = load_models(context.artifacts["prior"], device="cpu")

    def labels(self, model_input) -> tuple[int, torch.Tensor | None]:
        """(n, labels or None) from what `predict` accepts."""
        prior = self.models.prior
        if isinstance(model_input, int | np.integer):
            return int(model_input), None
        if isinstance(model_input, pd.DataFrame):
            if "prompt" in model_input.columns:
                prompts = [None if pd.isna(v) else str(v) for v in model_input["prompt"]]
                return len(prompts), prompt_condition(prior, prompts)
            if "class" not in model_input.columns:
                return len(model_input), None
            values = [None if pd.isna(v) else v for v in model_input["class"]]
        else:
            values = list(np.asarray(model_input).reshape(-1))
        if not values or all(v is None for v in values):
            return len(values), None
        ids = [-1 if v is None else resolve_class(v, prior.num_classes, self.models.class_names) for v in values]
        return len(ids), torch.tensor(ids, dtype=torch.long)

    def predict(self, context, model_input, params=None):
        params = dict(params or {})
        output = params.pop("output", "tokens")
        if output not in ("tokens", "images"):
            raise ValueError(f"output must be 'tokens' or 'images', got {output!r}")
        seed = int(params.pop("seed", 0) or 0)
        options = SamplingOptions(**{k: v for k, v in params.items() if v is not None})
        n, labels = self.labels(model_input)
        if (self.models.prior.num_classes or self.models.prior.conditioning == "text") and labels is None:
            labels = self.models.prior.null_condition(n)  # unconditional samples
        sampler = Sampler(self.models.prior, options, torch.Generator().manual_seed(seed))
        images, tokens, _ = sample_images(sampler, self.models.tokenizer, n, labels, BATCH)
        if output == "tokens":
            return tokens.cpu().numpy()
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


mlflow.models.set_model(PriorModel())
