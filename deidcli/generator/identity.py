"""Identity network: MobileFaceNet (arXiv:1804.07573) as a differentiable torch module.

The layout matches ``rec_mobilefacenet.pt`` in the shared models (307 tensors, names
conv1, dw_conv, features.0-14, conv2, gdconv, conv3, bn), so the state dict loads with
strict key matching and reproduces ``rec_mobilefacenet.onnx``.

Array contract: input (B, 3, 112, 112) float RGB in [-1, 1], i.e. ``(x - 127.5) / 127.5``
of an ArcFace-aligned 112x112 crop; output (B, 128) float embedding (not normalised; use
:func:`embed` for L2-normalised descriptors).

Training uses :meth:`MobileFaceNet.feature_maps` for the attractor loss (low/mid-level
maps kept close between input and output) and the final embedding for the repeller loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import ModelError

#: Registry name of the identity network's state dict.
IDENTITY_MODEL = "rec_mobilefacenet.pt"
#: Input side of the identity network.
ID_SIZE = 112
#: Embedding size.
ID_DIM = 128

#: Names of the feature maps that :meth:`MobileFaceNet.feature_maps` can return, in order,
#: with their (channels, side) for a 112 input.
FEATURE_LEVELS = {
    "stem": (64, 56),  # after conv1 (3x3 s2 conv-BN-ReLU6)
    "dw": (64, 56),  # after the depthwise-separable block
    "b4": (64, 28),  # end of the first bottleneck stage (5 blocks, 64 ch)
    "b5": (128, 14),  # first 128-ch block (stride 2)
    "b11": (128, 14),  # end of the 14x14 stage
    "b14": (128, 7),  # end of the last stage (high level; not used by the attractor by default)
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, inp: int, out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, out, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, inp: int, out: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(inp, inp, kernel_size, padding=padding, groups=inp, bias=False)
        self.pointwise = nn.Conv2d(inp, out, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inp)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


class GDConv(nn.Module):
    def __init__(self, inp: int, kernel_size: int = 7):
        super().__init__()
        self.depthwise = nn.Conv2d(inp, inp, kernel_size, padding=0, groups=inp, bias=False)
        self.bn = nn.BatchNorm2d(inp)

    def forward(self, x):
        return self.bn(self.depthwise(x))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_res = stride == 1 and inp == out
        self.conv = nn.Sequential(
            ConvBNReLU(inp, hidden, kernel_size=1),
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet; ``forward`` maps (B, 3, 112, 112) RGB in [-1, 1] to (B, 128)."""

    SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def __init__(self, embedding_size: int = ID_DIM):
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, stride=2)
        self.dw_conv = DepthwiseSeparableConv(64, 64)
        blocks, cin = [], 64
        for t, c, n, s in self.SETTING:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.conv2 = ConvBNReLU(cin, 512, kernel_size=1)
        self.gdconv = GDConv(512, 7)
        self.conv3 = nn.Conv2d(512, embedding_size, 1)
        self.bn = nn.BatchNorm2d(embedding_size)

    def _head(self, x):
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1:] == (3, ID_SIZE, ID_SIZE), tuple(x.shape)
        x = self.dw_conv(self.conv1(x))
        return self._head(self.features(x))

    def feature_maps(self, x: torch.Tensor, levels: Sequence[str],
                     with_embedding: bool = False):
        """Intermediate maps named in ``levels`` (keys of FEATURE_LEVELS), in that order;
        with ``with_embedding`` also returns the (B, 128) embedding: ``(maps, emb)``.
        Stops early when the embedding is not needed."""
        assert x.ndim == 4 and x.shape[1:] == (3, ID_SIZE, ID_SIZE), tuple(x.shape)
        for name in levels:
            if name not in FEATURE_LEVELS:
                raise ValueError(f"unknown feature level {name!r}; one of {list(FEATURE_LEVELS)}")
        want = set(levels)
        got = {}
        x = self.conv1(x)
        got["stem"] = x
        x = self.dw_conv(x)
        got["dw"] = x
        last = max(int(n[1:]) for n in want if n.startswith("b")) if any(
            n.startswith("b") for n in want) else -1
        if with_embedding:
            last = len(self.features) - 1
        for i, block in enumerate(self.features):
            if i > last:
                break
            x = block(x)
            got[f"b{i}"] = x
        maps = [got[n] for n in levels]
        if with_embedding:
            return maps, self._head(x)
        return maps


def _models_dir(models_dir: Optional[Path]) -> Path:
    return Path(models_dir) if models_dir else Path(
        os.environ.get("DEID_MODELS_DIR", Path.home() / ".cache" / "deid"))


def model_file(name: str, models_dir: Optional[Path] = None) -> Path:
    """Path of a registry model file. Uses ``deidcli.weights.model_path`` (SHA-256 verified)
    when that module is available, else looks in ``models_dir`` / $DEID_MODELS_DIR."""
    try:
        from ..weights import model_path  # noqa: WPS433 (optional until the registry lands)
    except ImportError:
        model_path = None
    if model_path is not None:
        return Path(model_path(name, models_dir))
    path = _models_dir(models_dir) / name
    if not path.is_file():
        raise ModelError(f"model file {name} not found in {path.parent}; "
                         "set --models-dir or DEID_MODELS_DIR")
    return path


def load_identity_net(models_dir: Optional[Path] = None, device: str | torch.device = "cpu",
                      path: Optional[Path] = None) -> MobileFaceNet:
    """MobileFaceNet with the shared weights, in eval mode, parameters frozen."""
    path = Path(path) if path else model_file(IDENTITY_MODEL, models_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = MobileFaceNet()
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # corrupt file, wrong layout
        raise ModelError(f"cannot load identity network {path}: {type(exc).__name__}: {exc}") from exc
    net.eval().requires_grad_(False)
    return net.to(device)


def to_input(crops_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 in [-1, 1]."""
    assert crops_uint8.ndim == 4 and crops_uint8.shape[-1] == 3 and crops_uint8.dtype == np.uint8
    x = torch.from_numpy(np.ascontiguousarray(crops_uint8)).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 127.5


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] (any device) -> (B, H, W, 3) uint8 RGB: the inverse of
    :func:`to_input` (clamped, rounded)."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def crop_to_id_input(x: torch.Tensor, margin: float) -> torch.Tensor:
    """Differentiable: (B, 3, S, S) generator crop in [-1, 1] -> (B, 3, 112, 112) ArcFace crop
    (the central :func:`deidcli.faces.align.arcface_box` square, bilinear resize, no warp)."""
    size = x.shape[-1]
    from ..faces.align import arcface_box

    off, side = arcface_box(size, margin)
    a, b = int(round(off)), int(round(off + side))
    x = x[..., a:b, a:b]
    if x.shape[-1] != ID_SIZE:
        x = F.interpolate(x, size=(ID_SIZE, ID_SIZE), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > ID_SIZE)
    return x


@torch.no_grad()
def embed(net: MobileFaceNet, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised (B, 128) descriptors of (B, 3, 112, 112) inputs in [-1, 1]."""
    dev = next(net.parameters()).device
    outs = [F.normalize(net(x[i:i + batch_size].to(dev)), dim=1).cpu()
            for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, ID_DIM)
