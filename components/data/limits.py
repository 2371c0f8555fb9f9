"""Bounds on what reading one input may cost: pixels, bytes, seconds, and which inputs may run
commands. Every reader (`read_shard`, folder and tar sources, image decoding, tokenization)
takes a `ReadLimits`; an input over a limit is one reject (or, for time, one unreadable shard)
whose reason names the limit, never a crash, a hang or memory without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pillow's own default (Image.MAX_IMAGE_PIXELS): a 1024 MB 24-bit image, ~9,459 x 9,459.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class ReadLimits:
    # An image whose header declares more pixels is rejected before it is decoded.
    max_image_pixels: int = PILLOW_MAX_IMAGE_PIXELS
    # A tar member (one field of a sample) larger than this is rejected unread (skipped over).
    max_member_bytes: int = 256 << 20
    # A file of a folder source larger than this is rejected unread.
    max_file_bytes: int = 256 << 20
    # A `pipe:` command that writes nothing for this many seconds is killed (0: no limit).
    pipe_idle_timeout: float = 300.0
    # Reading one input shard (a `pipe:` command, or any other) may take this many seconds
    # before it is abandoned as unreadable and retried (0: no limit).
    shard_timeout: float = 0.0
    # `pipe:` specs found inside `@FILE` lists run only when this is true: a list file is data,
    # often written by someone else, and a `pipe:` line in it is a shell command.
    allow_pipe_in_lists: bool = False

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_member_bytes", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("pipe_idle_timeout", "shard_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds (0: no limit), got {getattr(self, name)}")


DEFAULT_LIMITS = ReadLimits()


def too_large(what: str, size: int, limit: int, setting: str) -> str:
    """A reject reason naming the limit and the setting that raises it."""
    return f"{what} of {size:,} bytes is over the limit of {limit:,} ({setting})"
