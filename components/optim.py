"""Muon for a transformer's hidden matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is
scalable for LLM training") keeps a Nesterov momentum of each matrix's gradient and steps along
its orthogonalised form: the momentum M = U S V^T replaced by about U V^T, computed by a few
Newton-Schulz iterations. Every direction of the update then gets the same size, however
lopsided the gradient's spectrum, which is what makes it learn more per step than Adam on the
2-D weights inside transformer blocks. Embeddings, the output head, norms and biases are not
such matrices (their rows are looked up or scored one at a time), and stay with AdamW.

One `torch.optim.Optimizer`, so a learning-rate scheduler, `state_dict()` and checkpoints treat
it as any other: each param group says which rule it follows (`muon: True`), and a scheduler's
factor scales both groups' rates alike.

    groups = muon_groups(model, muon_lr=0.02, lr=3e-3, weight_decay=0.01)
    optimizer = MuonAdamW(groups)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# The quintic iteration's coefficients (Jordan et al.): they drive every singular value of a
# matrix scaled to norm <= 1 into roughly [0.7, 1.2] in five steps, which is what Muon needs
# (the exact polar factor is not: its direction is).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U V^T of `matrix` = U S V^T (each singular value taken to ~1), by `steps` quintic
    Newton-Schulz iterations computed in `dtype` (bf16 is what GPUs and AVX512-BF16 CPUs run
    fastest, and enough for a direction). A stack (..., rows, cols) is done matrix by matrix
    in one batched product. A zero matrix stays zero. Returns `dtype`."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: X X^T is the smaller product
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): Muon's. Not
    embeddings, the output head, norms or biases."""
    return param.ndim == 2 and "blocks" in name.split(".")


def muon_groups(model: nn.Module, muon_lr: float, lr: float, weight_decay: float) -> list[dict]:
    """Param groups for MuonAdamW: the blocks' matrices under Muon at `muon_lr`; the rest under
    AdamW at `lr`, weight decay on the head's matrices only (decaying norms, biases and
    embeddings hurts small models). Shared parameters (a tied head) are listed once."""
    muon, decay, no_decay, seen = [], [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if is_hidden_matrix(name, param):
            muon.append(param)
        elif param.ndim >= 2 and "emb" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": muon, "muon": True, "lr": muon_lr, "weight_decay": weight_decay},
        {"params": decay, "muon": False, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "muon": False, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with `muon: True`, AdamW (decoupled weight decay) on the others.

    A Muon step on a matrix W (out x in) with gradient G: M <- mu M + G; the update is the
    orthogonalised Nesterov momentum G + mu M, scaled by sqrt(max(1, out / in)) so that tall
    and wide matrices move alike per entry; W <- W (1 - lr wd) - lr update."""

    def __init__(
        self,
        params: Iterable[dict],
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ):
        groups = list(params)
        for group in groups:
            if group.get("muon") and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon's groups hold 2-D matrices only")
        defaults = {"momentum": momentum, "betas": betas, "eps": eps, "ns_steps": ns_steps, "muon": False}
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype  # how the orthogonalisation computes (not state: a resumed run may differ)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(param)
            buffer = state["momentum"]
            buffer.mul_(mu).add_(param.grad)
            by_shape.setdefault(tuple(param.shape), []).append((param, param.grad.add(buffer, alpha=mu)))
        # The matrices of one shape (every block's qkv, ...) orthogonalised in one batched product.
        for (rows, cols), items in by_shape.items():
            updates = orthogonalise(torch.stack([u for _, u in items]), group["ns_steps"], self.ns_dtype)
            scale = math.sqrt(max(1.0, rows / cols))
            for (param, _), update in zip(items, updates, strict=True):
                param.mul_(1 - lr * wd).add_(update.to(param.dtype), alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            step = float(state["step"])
            state["exp_avg"].lerp_(param.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
            param.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
