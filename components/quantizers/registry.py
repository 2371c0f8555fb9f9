"""Quantizer registry: `type` in params.yaml -> a config class whose `build(dim)` returns the module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

QUANTIZERS: dict[str, type[QuantizerConfig]] = {}


class QuantizerConfig(BaseModel):
    """Base of every quantizer's config. Subclasses set `type`, give a `codebook_size` (a field,
    or a property where it follows from other options, as FSQ's levels), implement `build` and,
    where options depend on the latent width, `latent_problems`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    def build(self, dim: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        """(option, message) for each option that cannot work with a latent of `latent_dim`."""
        return []

    def check_latent(self, latent_dim: int) -> None:
        problems = self.latent_problems(latent_dim)
        if problems:
            raise ValueError("; ".join(f"quantizer.{key}: {msg}" for key, msg in problems))


def register(name: str):
    """Class decorator: make a quantizer config selectable as `quantizer: {type: name}`."""

    def wrap(cls: type[QuantizerConfig]) -> type[QuantizerConfig]:
        QUANTIZERS[name] = cls
        return cls

    return wrap


def options_of(name: str) -> list[str]:
    return sorted(QUANTIZERS[name].model_fields)


def types_with_option(option: str) -> list[str]:
    return sorted(name for name, cls in QUANTIZERS.items() if option in cls.model_fields)
