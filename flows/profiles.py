"""Params profiles: a YAML file of params.yaml's sections holding only the values that differ
(`profiles/gpu-256.yaml`: 256-px images, LlamaGen's VQ-16 recipe on a GPU).

A profile is applied *to params.yaml*, never beside it: DVC reads params.yaml, so the stages the
changed keys feed become stale and nothing else does, and the run stays reproducible from the
repo. Comments and layout of params.yaml are kept.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from components.config import merge_profile, merges_into, overlay, parse_params, read_profile, read_yaml


def changed_keys(base: Any, profile: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for each value the profile changes."""
    if merges_into(base, profile):
        return [
            change for key, value in profile.items() for change in changed_keys(base.get(key), value, f"{prefix}{key}.")
        ]
    return [] if base == profile else [(prefix.rstrip("."), base, profile)]


def apply_profile(params_path: str | Path, profile_path: str | Path) -> list[tuple[str, Any, Any]]:
    """Write the profile's values into params.yaml (after validating the result: nothing is
    written when it is invalid); returns what changed."""
    params_path = Path(params_path)
    raw, profile = read_yaml(params_path), read_profile(profile_path)
    # ConfigError, naming the bad keys, before any write.
    parse_params(merge_profile(raw or {}, profile), f"{params_path} with profile {profile_path}")
    yaml = YAML()  # round-trip: comments and key order stay
    yaml.width = 120
    # `null` stays `null` (ruamel writes an empty value): the diff shows only what the profile changed.
    yaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(params_path.read_text())
    overlay(document, profile)
    text = io.StringIO()
    yaml.dump(document, text)
    tmp = params_path.with_name(f".{params_path.name}.tmp")
    tmp.write_text(text.getvalue())
    tmp.replace(params_path)
    return changed_keys(raw, profile)
