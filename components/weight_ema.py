"""An exponential moving average of a model's weights (Polyak averaging), the model that is
validated and exported when training keeps one.

    ema = WeightEMA(model, decay=0.9999)
    ...  optimizer.step(); ema.update(model)
    ema.model        # a copy of `model`'s architecture holding the averages

Parameters are averaged; buffers (EMA codebooks and their counts, which are already running
statistics, dead-code counters, clocks) are copied from the live model, so the averaged
weights always meet the codebook they were trained against.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: early weights,
    far from trained, fade in tens of steps, not in 1 / (1 - decay)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        # One fused update over all parameters (a kernel per tensor costs hundreds of launches
        # per step on a GPU); the copy has the live model's parameters in the same order.
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        live_buffers = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(live_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
