"""``--det-size``: ``auto`` (the default: follows the frame) or a fixed detector input size."""

from __future__ import annotations

import click

from ..options import DET_SIZE_AUTO


class DetSize(click.ParamType):
    """``auto`` -> options.DET_SIZE_AUTO (0), or a positive multiple of 32 (px)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        elif str(value).strip().lower() == "auto":
            return DET_SIZE_AUTO
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not 'auto' or a whole number of pixels", param, ctx)
        if n <= 0 or n % 32:
            self.fail(f"{n} is not a positive multiple of 32 (or 'auto')", param, ctx)
        return n


DET_SIZE_HELP = ("Detector input size, longer side (px, a multiple of 32). auto: half the frame's longer "
                 "side, at least 640 (1080p is searched at 960, 4K at 1920), so faces down to the same "
                 "size in pixels are found at any resolution; a fixed 640 is cheaper on large frames "
                 "but misses their small faces.")


def det_size_option():
    return click.option("--det-size", type=DetSize(), default="auto", show_default=True, help=DET_SIZE_HELP)
