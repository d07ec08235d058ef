"""Export a run's generator as the shipped checkpoint (fp16, self-describing, weights_only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...generator.model import read_checkpoint, save_generator


def export_generator(src: Path, dst: Path, extra_meta: Optional[dict] = None) -> Path:
    """Re-save ``src`` (runs/<name>/generator.pt or last.pt's generator) to ``dst`` with fp16
    weights and ``extra_meta`` (e.g. evaluation metrics) merged into its meta."""
    import torch

    from ...generator.model import Generator

    ck = read_checkpoint(src)
    g = Generator(ck["config"])
    g.load_state_dict({k: v.float() if v.is_floating_point() else v
                       for k, v in ck["state_dict"].items()})
    meta = dict(ck["meta"])
    meta.update(extra_meta or {})
    meta = json.loads(json.dumps(meta))  # plain data only
    torch.set_grad_enabled(True)
    return save_generator(dst, g, meta, half=True)
