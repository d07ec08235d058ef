"""Generator and discriminator nn.Modules, plus self-describing checkpoint helpers.

Generator contract (the video pipeline codes against it)::

    raw, mask = generator(x, desc)
    # x:    (B, 3, S, S) float RGB in [-1, 1], an aligned crop (deidcli.faces.align geometry,
    #       S = generator.config["size"], margin = generator.config["margin"])
    # desc: (B, D) float, L2-normalised identity descriptor (D = config["id_dim"], MobileFaceNet)
    # raw:  (B, 3, S, S) in [-1, 1] (tanh);  mask: (B, 1, S, S) in [0, 1] (sigmoid)
    blended = mask * raw + (1 - mask) * x   # done by the caller

Architecture (design choices where the paper is silent):
- encoder: a 3x3 stem at full resolution, then depthwise-separable stride-2 convolutions
  with InstanceNorm + LeakyReLU, down to 8x8 (4 downsamplings at 128, 5 at 256: the
  resolution is a config change only);
- bottleneck: the descriptor is projected by a linear layer, tiled over the 8x8 grid and
  concatenated to the bottleneck features, fused by a 1x1 conv, then residual blocks. A fully
  connected bottleneck (8*8*C -> 8*8*C) would cost ~67 M parameters at C=128, far beyond this
  compute budget; the 1x1 fusion is the same concatenation applied per position. The descriptor
  also modulates every decoder level (FiLM scale/shift after InstanceNorm), so the identity
  code acts on features at every scale rather than only at 8x8;
- decoder: pixel-shuffle x2 upsampling blocks, each followed by a residual block (full 3x3
  depthwise-separable by default; "full" 3x3 convs are an option: on CPU they cost about the same time,
  as these layers are memory-bound; the full-resolution level has none by default, for
  speed), with additive U-Net skips from the encoder (needed for sharp outputs with a small
  network and short training; the mask and the repeller decide what changes);
- head: 3x3 conv to 3 RGB channels (tanh) + 1 mask channel (sigmoid).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import ModelError

CHECKPOINT_FORMAT = "deid-generator"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class GeneratorConfig:
    size: int = 128  # crop side S (power of two >= 32); 256 is a config change only
    margin: float = 0.2  # crop margin (deidcli.faces.align geometry) the generator was trained with
    id_dim: int = 128  # identity descriptor size (MobileFaceNet embedding)
    base_channels: int = 16  # channels of the full-resolution stem
    max_channels: int = 128  # channel cap for deep levels
    bottleneck: int = 8  # side of the bottleneck grid
    bottleneck_blocks: int = 2  # residual 3x3 blocks at the bottleneck
    film: bool = True  # descriptor modulates decoder levels (FiLM)
    skips: bool = True  # additive encoder->decoder skips
    res_conv: str = "ds"  # decoder residual blocks: "ds" depthwise-separable or "full" 3x3 convs
    final_res: bool = False  # residual block also at full resolution (costly on CPU)
    mask_bias: float = 0.0  # initial mask logit (0 -> mask starts around 0.5)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]] = None) -> "GeneratorConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown generator config keys: {sorted(unknown)}")
        cfg = cls(**d)
        n = math.log2(cfg.size / cfg.bottleneck)
        if cfg.size < 32 or n != int(n) or n < 1:
            raise ValueError(f"size {cfg.size} must be bottleneck * 2**k (k >= 1)")
        if cfg.res_conv not in ("full", "ds"):
            raise ValueError(f"res_conv must be 'full' or 'ds', not {cfg.res_conv!r}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def chans(self) -> list:
        """Channels per level, full resolution first, the bottleneck last."""
        n = int(round(math.log2(self.size / self.bottleneck)))
        return [min(self.base_channels * 2 ** i, self.max_channels) for i in range(n + 1)]


def _act():
    return nn.LeakyReLU(0.2, inplace=True)


class DSConv(nn.Module):
    """Depthwise 3x3 (stride s) + pointwise 1x1 + InstanceNorm (+ activation)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = nn.InstanceNorm2d(cout, affine=True)
        self.act = _act() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.pw(self.dw(x))))


class DSResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.a = DSConv(ch, ch)
        self.b = DSConv(ch, ch, act=False)

    def forward(self, x):
        return x + self.b(self.a(x))


class ResBlock(nn.Module):
    """Full 3x3 residual block. On CPU a full 3x3 conv at these small channel counts is faster
    than depthwise + pointwise (memory-bound: one pass over the activations instead of two)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.InstanceNorm2d(ch, affine=True), _act(),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.InstanceNorm2d(ch, affine=True))

    def forward(self, x):
        return x + self.body(x)


class UpBlock(nn.Module):
    """1x1 conv -> PixelShuffle(2) -> InstanceNorm (FiLM by descriptor) -> LReLU -> (+skip)
    -> depthwise-separable residual block."""

    def __init__(self, cin: int, cout: int, id_dim: int, film: bool, res: str | None = "full"):
        super().__init__()
        self.expand = nn.Conv2d(cin, cout * 4, 1, bias=False)
        with torch.no_grad():  # ICNR init: all 4 sub-pixels start equal (no checkerboard)
            w = torch.empty(cout, cin, 1, 1)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.expand.weight.copy_(w.repeat_interleave(4, dim=0))
        self.shuffle = nn.PixelShuffle(2)
        self.norm = nn.InstanceNorm2d(cout, affine=not film)
        self.film = nn.Linear(id_dim, 2 * cout) if film else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            with torch.no_grad():
                self.film.bias.zero_()
                self.film.bias[:cout] = 1.0  # scale 1, shift 0 at init
        self.act = _act()
        self.res = {"full": ResBlock, "ds": DSResBlock}[res](cout) if res else nn.Identity()

    def forward(self, x, desc, skip=None):
        x = self.norm(self.shuffle(self.expand(x)))
        if self.film is not None:
            g, b = self.film(desc).chunk(2, dim=1)
            x = x * g[:, :, None, None] + b[:, :, None, None]
        x = self.act(x)
        if skip is not None:
            x = x + skip
        return self.res(x)


class Generator(nn.Module):
    """Encoder-decoder de-identification generator (see module docstring)."""

    def __init__(self, config: Union[GeneratorConfig, Mapping[str, Any], None] = None):
        super().__init__()
        cfg = config if isinstance(config, GeneratorConfig) else GeneratorConfig.from_dict(config)
        self.cfg = cfg
        self.config = cfg.to_dict()  # plain dict: size, margin, id_dim, ... (pipeline reads it)
        chans = cfg.chans
        n_down = len(chans) - 1
        self.chans = chans
        self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 3, 1, 1, bias=False),
                                  nn.InstanceNorm2d(chans[0], affine=True), _act())
        self.down = nn.ModuleList(DSConv(chans[i], chans[i + 1], stride=2) for i in range(n_down))
        cb = chans[-1]
        self.id_proj = nn.Linear(cfg.id_dim, cb)
        self.fuse = nn.Sequential(nn.Conv2d(2 * cb, cb, 1, bias=False),
                                  nn.InstanceNorm2d(cb, affine=True), _act())
        self.mid = nn.Sequential(*[ResBlock(cb) for _ in range(cfg.bottleneck_blocks)])
        self.up = nn.ModuleList(
            UpBlock(chans[i + 1], chans[i], cfg.id_dim, cfg.film,
                    cfg.res_conv if (i > 0 or cfg.final_res) else None)
            for i in reversed(range(n_down)))
        self.head = nn.Conv2d(chans[0], 4, 3, 1, 1)
        with torch.no_grad():
            self.head.bias[3] = cfg.mask_bias

    def forward(self, x: torch.Tensor, desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, d = self.cfg.size, self.cfg.id_dim
        assert x.ndim == 4 and x.shape[1:] == (3, s, s), (tuple(x.shape), s)
        assert desc.ndim == 2 and desc.shape == (x.shape[0], d), (tuple(desc.shape), d)
        desc = desc.to(x.dtype)
        h = self.stem(x)
        skips = [h]
        for blk in self.down:
            h = blk(h)
            skips.append(h)
        skips.pop()  # the bottleneck itself
        z = self.id_proj(desc)[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        h = self.mid(self.fuse(torch.cat([h, z], dim=1)))
        for blk in self.up:
            skip = skips.pop()
            h = blk(h, desc, skip if self.cfg.skips else None)
        out = self.head(h)
        raw = torch.tanh(out[:, :3])
        mask = torch.sigmoid(out[:, 3:4])
        return raw, mask


class SubPixelDeconv(nn.Module):
    """A bias-free 1x1 conv (cin -> 4 * cout) followed by PixelShuffle(2), as the one layer it
    equals: ConvTranspose2d(cin, cout, kernel 2, stride 2), whose output pixel (2y + i, 2x + j)
    of channel c is input pixel (y, x) times the 1x1 weights of conv channel 4c + 2i + j. The same
    sums (over cin) in the same order, so ONNX Runtime gives the same result to the bit, without
    DepthToSpace, which on the CPU took about as long as the conv itself (see for_export)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        cout4, cin, kh, kw = conv.weight.shape
        assert (kh, kw) == (1, 1) and cout4 % 4 == 0 and conv.bias is None, (conv.weight.shape, conv.bias)
        self.deconv = nn.ConvTranspose2d(cin, cout4 // 4, 2, 2, bias=False)
        with torch.no_grad():  # (4c + 2i + j, k) -> (k, c, i, j)
            w = conv.weight[:, :, 0, 0].reshape(cout4 // 4, 2, 2, cin).permute(3, 0, 1, 2)
            self.deconv.weight.copy_(w.to(self.deconv.weight.dtype))
        self.deconv.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x):
        return self.deconv(x)


class HeadAsDeconv(nn.Module):
    """A 3x3 stride-1 conv (padding 1, with bias) as the transposed conv it equals (kernel flipped,
    in/out swapped): the same function (to float rounding, ~5e-7). For ONNX Runtime on the CPU,
    where a Conv with few output channels (the generator's head: 4) is computed in its blocked
    NCHWc layout padded to 16 channels (AVX-512), between two layout reorders at full
    resolution; ConvTranspose stays in NCHW (see for_export)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1), conv
        assert conv.groups == 1 and conv.dilation == (1, 1) and conv.bias is not None, conv
        self.deconv = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=True)
        with torch.no_grad():
            self.deconv.weight.copy_(conv.weight.flip(2, 3).transpose(0, 1))
            self.deconv.bias.copy_(conv.bias)
        self.deconv.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x):
        return self.deconv(x)


def for_export(generator: "Generator") -> "Generator":
    """A copy of ``generator`` (eval mode) that computes the same function with each decoder
    block's 1x1 conv + PixelShuffle(2) as one transposed conv (:class:`SubPixelDeconv`) and the
    head as a transposed conv (:class:`HeadAsDeconv`): the module deid exports to ONNX Runtime on
    the CPU. There (ONNX Runtime's profiler, shipped 128 generator, batch 32, one thread) the
    DepthToSpace ops took 16% of the network's time, the layout reorders around ops outside the
    blocked layout 21%; the export runs 117-120 -> 227-239 faces/s together with one face a call
    (research/bench_generator_backends.py). ``generator`` is not changed."""
    import copy

    g = copy.deepcopy(generator).eval()
    for blk in g.up:
        blk.expand = SubPixelDeconv(blk.expand)
        blk.shuffle = nn.Identity()
    g.head = HeadAsDeconv(g.head)
    return g


def widening(old: Union[GeneratorConfig, Mapping[str, Any]],
             new: Union[GeneratorConfig, Mapping[str, Any]]) -> tuple[list, list]:
    """The channels per level of generators ``old`` and ``new`` when ``new`` is a widening of
    ``old`` (widen_state_dict); ValueError, saying why, when it is not."""
    a = old if isinstance(old, GeneratorConfig) else GeneratorConfig.from_dict(old)
    b = new if isinstance(new, GeneratorConfig) else GeneratorConfig.from_dict(new)
    same = {f.name for f in fields(GeneratorConfig)} - {"base_channels", "max_channels"}
    diff = sorted(k for k in same if getattr(a, k) != getattr(b, k))
    if diff:
        raise ValueError(f"widening changes only channel counts; these differ too: {diff}")
    ca, cb = a.chans, b.chans
    if any(y < x or y % x for x, y in zip(ca, cb)):
        raise ValueError(f"each level's channels must be a multiple of the old: {ca} -> {cb}")
    return ca, cb


def widen_state_dict(state: Mapping[str, torch.Tensor], old: Union[GeneratorConfig, Mapping[str, Any]],
                     new: Union[GeneratorConfig, Mapping[str, Any]], noise: float = 0.0,
                     seed: int = 0) -> dict:
    """The weights of a wider generator (``new``: more channels per level) that computes the same
    function as ``state`` (a ``Generator(old)`` state dict), after Chen, Goodfellow & Shlens,
    "Net2Net" (ICLR 2016): new channel ``j`` of a level with ``c`` old channels copies old channel
    ``j % c``; weights reading a widened level are divided by the widening factor, so the copies
    sum to the old contribution; InstanceNorm sees identical statistics on identical copies.
    Copies would stay identical under training, so every weight tensor of a widened layer gets
    Gaussian noise of ``noise`` times its own standard deviation (0: the function exactly).

    Only the channel counts may differ (``base_channels`` / ``max_channels``), each level's new
    count a multiple of its old one. Why: a generator trained for many steps can be given more
    capacity without starting again (weights/MODEL_CARD.md, Schedule, 2026-12-01)."""
    ca, cb = widening(old, new)
    gb = Generator(new if isinstance(new, GeneratorConfig) else GeneratorConfig.from_dict(new))
    n = len(ca) - 1
    maps = [torch.arange(y) % x for x, y in zip(ca, cb)]

    def idx(lv, sub=1):  # index into the old axis for each new position (sub-pixel groups kept)
        m = maps[lv]
        return (m[:, None] * sub + torch.arange(sub)).reshape(-1) if sub > 1 else m

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, new_t in gb.state_dict().items():
        w = state[key].float()
        mod, name = key.rsplit(".", 1)
        lo = li = None  # levels of the output and the input axis
        sub_o, halves = 1, False
        if mod.startswith("stem."):
            lo = 0
        elif mod.startswith("down."):
            i = int(mod.split(".")[1])
            lo, li = (i, None) if mod.endswith(".dw") else (i + 1, i if mod.endswith(".pw") else None)
        elif mod == "id_proj":
            lo = n
        elif mod.startswith("fuse.") or mod.startswith("mid."):
            lo = n
            li = n if name == "weight" and w.ndim == 4 else None
        elif mod.startswith("up."):
            lv = n - 1 - int(mod.split(".")[1])  # up.0 is the coarsest decoder level
            if mod.endswith(".expand"):
                lo, li, sub_o = lv, lv + 1, 4
            elif mod.endswith(".film"):
                lo, halves = lv, True
            else:  # the residual block: depthwise, pointwise and norms of this level
                lo = lv
                li = lv if w.ndim == 4 and w.shape[1] > 1 else None  # not the depthwise convs
        elif mod == "head":
            li = 0
        else:
            raise ValueError(f"widen_state_dict: no rule for {key}")
        if lo is not None and w.shape[0] != new_t.shape[0]:
            if halves:
                h = w.shape[0] // 2
                w = torch.cat([w[:h][idx(lo)], w[h:][idx(lo)]])
            else:
                w = w[idx(lo, sub_o)]
        if li is not None and w.ndim >= 2 and w.shape[1] != new_t.shape[1]:
            if mod == "fuse.0":  # [bottleneck features, tiled descriptor projection]
                h = w.shape[1] // 2
                w = torch.cat([w[:, :h][:, maps[n]], w[:, h:][:, maps[n]]], 1) / (cb[n] // ca[n])
            else:
                w = w[:, idx(li)] / (cb[li] // ca[li])
        if tuple(w.shape) != tuple(new_t.shape):
            raise ValueError(f"widen_state_dict: {key} {tuple(w.shape)} != {tuple(new_t.shape)}")
        if noise > 0 and w.is_floating_point() and tuple(state[key].shape) != tuple(w.shape) and w.numel() > 1:
            w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
        out[key] = w.to(new_t.dtype)
    return out


class Discriminator(nn.Module):
    """Patch discriminator (LSGAN / hinge): (B, 3, S, S) in [-1, 1] -> (B, 1, S/8, S/8) logits."""

    def __init__(self, channels: int = 32, n_layers: int = 3, spectral: bool = True):
        super().__init__()
        sn = nn.utils.spectral_norm if spectral else (lambda m: m)
        layers, cin = [], 3
        for i in range(n_layers):
            cout = channels * 2 ** i
            layers += [sn(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers += [sn(nn.Conv2d(cin, cin, 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True),
                   sn(nn.Conv2d(cin, 1, 3, 1, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeatureDiscriminator(nn.Module):
    """Discriminator heads on a frozen network's feature maps (after Sauer et al., "Projected
    GANs Converge Faster", NeurIPS 2021): one small conv head per map, each giving patch logits.

    ``maps``: one (channels, side) per input map, e.g. MobileFaceNet's
    ``identity.FEATURE_LEVELS`` entries; maps larger than 28 px are strided down to about 28 px
    first. forward(list of (B, C_i, H_i, W_i)) -> list of (B, 1, h_i, w_i) logits.
    Why: a patch discriminator on pixels, trained alongside the generator on 2 CPU cores, tells
    real eyes from the generator's on barely more than chance (weights/MODEL_CARD.md, "How weak
    the discriminators are"), and the training loop computes these maps anyway for the attractor.
    Measured (MODEL_CARD, Schedule, 2026-11-30): with the shipped generator frozen, on MobileFaceNet's
    stem, dw and b4 maps, it tells outputs from photos on 63% of held-out faces after 200 steps
    (the pixel eye discriminator: 56% after 300); a 3,600-step branch with it did not change the
    eyes. Off by default (``weights.feat_adv`` 0)."""

    def __init__(self, maps, channels: int = 64, spectral: bool = True):
        super().__init__()
        sn = nn.utils.spectral_norm if spectral else (lambda m: m)
        self.heads = nn.ModuleList()
        for cin, side in maps:
            stride = max(1, int(side) // 28)
            self.heads.append(nn.Sequential(
                sn(nn.Conv2d(int(cin), channels, 3, stride, 1)), nn.LeakyReLU(0.2, inplace=True),
                sn(nn.Conv2d(channels, channels, 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True),
                sn(nn.Conv2d(channels, 1, 1))))

    def forward(self, maps) -> list:
        assert len(maps) == len(self.heads), (len(maps), len(self.heads))
        return [h(m) for h, m in zip(self.heads, maps)]


# --------------------------------------------------------------------------- checkpoints


def save_generator(path: Union[str, Path], generator: Generator, meta: Optional[dict] = None,
                   half: bool = True) -> Path:
    """Write a self-describing generator checkpoint atomically (tmp file + os.replace).

    Contents: {"format", "version", "config", "state_dict" (fp16 floats when ``half``),
    "meta"}. ``meta`` holds plain data only (str/int/float/bool/list/dict/None).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in generator.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous().clone()
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": dict(generator.config), "state_dict": state, "meta": dict(meta or {})}
    tmp = path.with_name(path.name + f".deid-tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: Union[str, Path]) -> dict:
    """Load and validate a generator checkpoint dict (weights_only); ModelError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"generator checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"generator checkpoint {path} is corrupt or not a torch file "
                         f"({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a deid generator checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ModelError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ModelError(f"{path}: checkpoint lacks config or state_dict")
    return ckpt


def load_generator(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32) -> Generator:
    """Generator from a checkpoint written by :func:`save_generator`, in eval mode.

    The crop geometry it expects is ``generator.config["size"]`` / ``["margin"]``;
    training metadata is in ``generator.meta``. Raises ModelError on any problem.
    """
    ckpt = read_checkpoint(path)
    try:
        gen = Generator(ckpt["config"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        gen.load_state_dict(state, strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: checkpoint does not fit the generator: {msg}") from exc
    gen.meta = dict(ckpt.get("meta") or {})
    return gen.to(device=device, dtype=dtype).eval()
