"""Quantizer registry: `type` in params.yaml -> a config class whose `build(dim)` returns the module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

QUANTIZERS: dict[str, type["QuantizerConfig"]] = {}


class QuantizerConfig(BaseModel):
    """Base of every quantizer's config; subclasses set `type` and implement `build`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    codebook_size: int

    def build(self, dim: int):  # pragma: no cover - abstract
        raise NotImplementedError


def register(name: str):
    """Class decorator: make a quantizer config selectable as `quantizer: {type: name}`."""

    def wrap(cls: type[QuantizerConfig]) -> type[QuantizerConfig]:
        QUANTIZERS[name] = cls
        return cls

    return wrap
