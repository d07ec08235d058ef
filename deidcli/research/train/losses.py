"""Training losses (Gafni et al. 2019, Sec. 3) and the counter-factual input distortions.

All images are (B, 3, S, S) float RGB in [-1, 1]; masks (B, 1, S, S) in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ...generator.identity import MobileFaceNet, crop_to_id_input


def attractor_repeller(idnet: MobileFaceNet, out: torch.Tensor, ref: torch.Tensor,
                       target_desc: torch.Tensor, levels: Sequence[str], margin: float,
                       rep_margin: float = 0.0, level_weights: Sequence[float] | None = None,
                       gen: torch.Generator | None = None, rescale: float = 1.0,
                       attr_src: torch.Tensor | None = None,
                       self_desc: torch.Tensor | None = None, self_weight: float = 0.0,
                       return_maps: bool = False):
    """(attractor, repeller, cos) for generator output ``out`` vs the input ``ref``; with
    ``return_maps`` also (out_maps, ref_maps), the feature maps the attractor compared (out's with
    gradient, ref's without), for :class:`deidcli.generator.model.FeatureDiscriminator`.

    attractor: mean over ``levels`` of the L1 distance between the identity network's
        feature maps of out and ref (keeps pose, expression, illumination);
    repeller: mean of relu(cos(desc(out), target_desc) - rep_margin), target_desc being the
        L2-normalised descriptor of (preferably another image of) the same person;
    cos: the per-sample cosine (detached), for logging.

    With ``self_desc`` (the input image's own descriptor) and ``self_weight`` > 0 the repeller
    also pushes away from the input photo itself, weighted by ``self_weight``.

    With ``attr_src`` (e.g. the raw output) the attractor compares attr_src instead of ``out``
    with ``ref``, while the repeller still looks at ``out``.

    With ``gen`` and ``rescale`` < 1 the repeller sees :func:`robust_view` of the output (random
    down-and-up scaling and shift), so high-frequency patterns that fool only this network at
    this exact scale do not pay off: identity has to change at the level of facial features,
    which is what transfers to other recognition networks.
    """
    x_out = crop_to_id_input(out, margin)
    with torch.no_grad():
        ref_maps = idnet.feature_maps(crop_to_id_input(ref, margin), levels)
    w = list(level_weights) if level_weights else [1.0] * len(levels)
    if attr_src is not None:
        out_maps = idnet.feature_maps(crop_to_id_input(attr_src, margin), levels)
        emb = idnet(robust_view(x_out, gen, rescale) if gen is not None and rescale < 1 else x_out)
    elif gen is None or rescale >= 1.0:
        out_maps, emb = idnet.feature_maps(x_out, levels, with_embedding=True)
    else:
        out_maps = idnet.feature_maps(x_out, levels)
        emb = idnet(robust_view(x_out, gen, rescale))
    attr = sum(wi * F.l1_loss(a, b) for wi, a, b in zip(w, out_maps, ref_maps)) / sum(w)
    rep, cos = _repel(emb, target_desc, rep_margin, self_desc, self_weight)
    if return_maps:
        return attr, rep, cos, (out_maps, ref_maps)
    return attr, rep, cos


def _repel(emb: torch.Tensor, target_desc: torch.Tensor, rep_margin: float,
           self_desc: torch.Tensor | None, self_weight: float):
    """(repeller, detached per-sample cosine to ``target_desc``) of raw embeddings ``emb``."""
    e = F.normalize(emb, dim=1)
    cos = (e * target_desc).sum(1)
    rep = F.relu(cos - rep_margin).mean()
    if self_desc is not None and self_weight > 0:
        rep = rep + self_weight * F.relu((e * self_desc).sum(1) - rep_margin).mean()
    return rep, cos.detach()


def eye_repeller(idnet: MobileFaceNet, out: torch.Tensor, ref: torch.Tensor, band: torch.Tensor,
                 target_desc: torch.Tensor, margin: float, rep_margin: float = 0.0,
                 gen: torch.Generator | None = None, rescale: float = 1.0,
                 self_desc: torch.Tensor | None = None, self_weight: float = 0.0):
    """(repeller, cos) of the eye band alone: the identity network's descriptor of the input
    ``ref`` with its eyes and brows taken from the output ``out`` (``band`` (1, 1, S, S) in
    [0, 1], e.g. :func:`deidcli.generator.engine.eye_pass_weight`), pushed away from ``target_desc`` (and,
    with ``self_weight``, from ``self_desc``) as in :func:`attractor_repeller`.

    Why: the whole-face repeller can be met by changing the rest of the face while the eyes keep
    their owner's shape, and an independent recognizer (dlib) reads much of the identity from the
    eye band (on lp_d13's crops the input's brows or lids pasted into an output bring it back).
    Measured (weights/MODEL_CARD.md, Schedule, 2026-11-30): it lowers this network's eye-band
    cosine, not dlib's, and smudges the eyes again; off by default (``weights.eye_rep`` 0)."""
    x = crop_to_id_input(band * out + (1 - band) * ref, margin)
    emb = idnet(robust_view(x, gen, rescale) if gen is not None and rescale < 1 else x)
    return _repel(emb, target_desc, rep_margin, self_desc, self_weight)


def robust_view(x: torch.Tensor, gen: torch.Generator, rescale: float) -> torch.Tensor:
    """(B, 3, 112, 112): resized to a random side in [rescale*112, 112] and back (antialiased),
    shifted by up to 2 px; the whole batch shares one draw."""
    side = x.shape[-1]
    s = int(round(side * (rescale + (1 - rescale) * float(torch.rand((), generator=gen)))))
    y = x
    if s < side:
        y = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(y, shifts=(dy, dx), dims=(2, 3))


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ax, ay = image_gradients(a)
    bx, by = image_gradients(b)
    return F.l1_loss(ax, bx) + F.l1_loss(ay, by)


def colour_l1(raw: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, cells: int = 8) -> torch.Tensor:
    """Low-frequency colour loss: L1 between the ``cells`` x ``cells`` block means of the raw
    output and of the input, each block weighted by the mean mask over it (where the output is
    used). Keeps skin tone and lighting; leaves shapes (the identity) free. Without it the
    repeller found a shortcut: it lightened dark skin to lower the identity cosine."""
    k = raw.shape[-1] // cells
    w = F.avg_pool2d(mask.detach(), k)
    return (w * (F.avg_pool2d(raw, k) - F.avg_pool2d(ref, k)).abs()).mean()


def mouth_weights(size: int, margin: float, soften: int = 5) -> torch.Tensor:
    """(1, 1, size, size) float32 weight map of the mouth of an aligned crop, summing to 1.

    The box of :func:`deidcli.faces.align.mouth_box`, box-blurred by ``soften`` px so the small warps
    of :func:`augment` move weight, not an edge."""
    from ...faces.align import mouth_box

    m = torch.from_numpy(mouth_box(size, margin, soften))[None, None]
    return m / m.sum()


def mouth_l1(out: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mouth-keeping loss: the ``weights``-weighted (:func:`mouth_weights`) L1 of the pixels and
    of the image gradients of the blended output ``out`` against the input ``ref``, mean over the
    batch and channels. The lips' edges are what a landmark model (and a viewer) reads the mouth
    opening from, and the 5-point landmark loss pins only the mouth corners. The generator may
    meet it either by drawing the same lips or by keeping the input's (a lower mask there)."""
    w = weights.to(out.dtype)
    pix = ((out - ref).abs() * w).sum((2, 3)).mean()
    ox, oy = image_gradients(out)
    rx, ry = image_gradients(ref)
    gx = ((ox - rx).abs() * w[..., :, 1:]).sum((2, 3)).mean()
    gy = ((oy - ry).abs() * w[..., 1:, :]).sum((2, 3)).mean()
    return pix + gx + gy


def feature_weights(size: int, margin: float, soften: int = 5, brows: bool = True) -> torch.Tensor:
    """(1, 1, size, size) float32 weight map of the eyes, brows and mouth of an aligned crop,
    summing to 1 (each of the three regions a third).

    The eyes with their brows of :func:`deidcli.faces.align.eye_boxes` and the mouth of
    :func:`mouth_weights`, box-blurred by ``soften`` px. ``brows=False``: the eye boxes stop
    0.25 inter-ocular distances above the eye (lids and iris, not the brow): the brows' shape is
    identity (pasting a person's brows into an output lets dlib re-identify it). Measured: the
    lids carry it too, so this alone does not stop the leak (weights/MODEL_CARD.md, 2026-11-30)."""
    from ...faces.align import eye_boxes

    m = torch.from_numpy(eye_boxes(size, margin, soften, top=0.5 if brows else 0.25))[:, None]
    m = m / m.sum((2, 3), keepdim=True)
    return (m.sum(0, keepdim=True) + mouth_weights(size, margin, soften)) / 3.0


def structure_l1(raw: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """Feature-structure loss: the ``weights``-weighted (:func:`feature_weights`) L1 between the
    image gradients of the luminance of the raw output and of the input, both average-pooled by
    ``pool`` (edges of lids, pupils, brows and the lip gap, not skin texture or colour), summed
    over the map, mean over the batch.

    On the raw output, not the blend, so it cannot be met by closing the mask (which is what the
    generator did with :func:`mouth_l1`): the generated face itself has to keep open eyes and the
    mouth's opening, where the repeller alone learnt to smudge them."""
    lum = torch.tensor([0.299, 0.587, 0.114], dtype=raw.dtype, device=raw.device).view(1, 3, 1, 1)
    a = (raw * lum).sum(1, keepdim=True)
    b = (ref * lum).sum(1, keepdim=True)
    w = weights.to(raw.dtype)
    if pool > 1:
        a, b = F.avg_pool2d(a, pool), F.avg_pool2d(b, pool)
        w = F.avg_pool2d(w, pool) * pool * pool
    ax, ay = image_gradients(a)
    bx, by = image_gradients(b)
    gx = ((ax - bx).abs() * w[..., :, 1:]).sum((2, 3)).mean()
    gy = ((ay - by).abs() * w[..., 1:, :]).sum((2, 3)).mean()
    return gx + gy


def eye_view(x: torch.Tensor, band: tuple[int, int, int, int], width: int = 128) -> torch.Tensor:
    """(B, C, width/2, width): the eye band (:func:`deidcli.faces.align.eye_band`) of ``x`` (B, C, S, S),
    resized (bilinear) to ``width`` px across, what the eye discriminator judges. The whole-crop
    patch discriminator sees an eye as a few of its 8x8 cells; at this scale lids, irises and brows
    fill its receptive field (global + local discriminators, as in inpainting)."""
    x0, y0, x1, y1 = band
    y = x[..., y0:y1, x0:x1]
    if x1 - x0 != width:
        y = F.interpolate(y, size=(width // 2, width), mode="bilinear", align_corners=False)
    return y


def total_variation(m: torch.Tensor) -> torch.Tensor:
    mx, my = image_gradients(m)
    return mx.abs().mean() + my.abs().mean()


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lsgan":
        return 0.5 * (((real_logits - 1) ** 2).mean() + (fake_logits ** 2).mean())
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def d_loss_multi(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """:func:`d_loss` averaged over the heads of a multi-head discriminator."""
    return sum(d_loss(r, f, kind) for r, f in zip(real, fake)) / len(real)


def g_adv_loss_multi(fake: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """:func:`g_adv_loss` averaged over the heads of a multi-head discriminator."""
    return sum(g_adv_loss(f, kind) for f in fake) / len(fake)


def g_adv_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lsgan":
        return 0.5 * ((fake_logits - 1) ** 2).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


# ------------------------------------------------------------------ counter-factual inputs


def augment(x: torch.Tensor, gen: torch.Generator, flip: float = 0.5, rotate_deg: float = 5.0,
            scale: float = 0.05, translate: float = 0.03, brightness: float = 0.1,
            contrast: float = 0.15, saturation: float = 0.15) -> torch.Tensor:
    """Random small similarity warp + horizontal flip + colour jitter, per sample.

    The result is the training input *and* the reference of the pixel / attractor losses: the
    network sees faces in slightly different poses, framings and colours than the aligned
    crops, so it cannot specialise to the exact alignment.
    """
    b, dev = x.shape[0], x.device

    def u(lo=-1.0, hi=1.0, shape=(b,)):
        return torch.rand(shape, generator=gen).to(dev) * (hi - lo) + lo

    ang = u() * math.radians(rotate_deg)
    sc = 1.0 + u() * scale
    fl = torch.where(u(0, 1) < flip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * fl, -sin, u() * translate], 1),
                         torch.stack([sin * fl, cos, u() * translate], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour jitter in [0, 1] space
    y = (y + 1) / 2
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * (1 + u() * contrast)[:, None, None, None] + mean
    y = y + (u() * brightness)[:, None, None, None]
    gray = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])
    s = (1 + u() * saturation)[:, None, None, None]
    y = gray + (y - gray) * s
    return (y.clamp(0, 1) * 2 - 1).contiguous()


def input_noise(x: torch.Tensor, gen: torch.Generator, sigma: float = 0.02,
                jpeg_like_blur: float = 0.3) -> torch.Tensor:
    """Distortion of the generator's input only (not of the loss reference): mild noise and,
    for a fraction of samples, a slight blur, so copying the input is never exactly right."""
    if sigma <= 0 and jpeg_like_blur <= 0:
        return x
    b = x.shape[0]
    y = x
    if jpeg_like_blur > 0:
        k = torch.tensor([1.0, 2.0, 1.0], device=x.device) / 4
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k2, groups=3)
        pick = (torch.rand((b,), generator=gen) < jpeg_like_blur).to(x.device)
        y = torch.where(pick[:, None, None, None], blurred, x)
    if sigma > 0:
        y = y + sigma * torch.randn(x.shape, generator=gen).to(x.device)
    return y.clamp(-1, 1)


# ------------------------------------------------------------------ in-the-wild degradations

#: The degradations of :func:`degrade`, in the order they are applied to a sample: the scene
#: (something in front of the face, the light's colour and level), the optics (defocus, motion),
#: then the sensor (a small face covers few pixels; noise and compression act at that
#: resolution, and the pipeline's crop upscales it all to the crop size).
DEGRADATIONS = ("occlusion", "colour_cast", "low_light", "blur", "motion_blur", "downscale",
                "noise", "jpeg")

# IJG (libjpeg) base quantisation tables, quality 50
_JPEG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
              14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
              18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_JPEG_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def _jpeg_table(base: Sequence[int], quality: float, device) -> torch.Tensor:
    q = min(max(float(quality), 1.0), 100.0)
    s = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    t = torch.floor((torch.tensor(base, dtype=torch.float32) * s + 50.0) / 100.0).clamp(1, 255)
    return t.view(8, 8).to(device)


def _dct8(device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix (rows: frequencies)."""
    n = torch.arange(8, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * math.sqrt(2 / 8)
    c[0] /= math.sqrt(2)
    return c.float().to(device)


def _dct_quantise(p: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W), H and W multiples of 8, level-shifted 0-255 values: each 8x8 block's DCT
    coefficients rounded to multiples of ``table``, transformed back."""
    n, _, h, w = p.shape
    c = _dct8(p.device)
    blk = p.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = c @ blk @ c.T
    coef = torch.round(coef / table) * table
    blk = c.T @ coef @ c
    return blk.permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)


def jpeg_approx(z: torch.Tensor, quality: float, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Baseline JPEG of ``z`` (N, 3, H, W) RGB in [0, 1] at IJG ``quality``, in torch: YCbCr,
    4:2:0 chroma, 8x8 block DCT quantised with the scaled standard tables, back (chroma
    upsampled bilinearly, as libjpeg's fancy upsampling), rounded to 8 bits. ``offset`` (dx, dy)
    shifts the block grid (a face crop is not aligned with its frame's blocks). No entropy
    coding (lossless) and no exact libjpeg rounding: close to cv2's JPEG at the same quality
    (tests/test_train.py compares them), deterministic, and without torchvision."""
    n, _, h, w = z.shape
    v = z.clamp(0, 1) * 255.0
    r, g, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128.0
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    dx, dy = int(offset[0]) % 8, int(offset[1]) % 8
    hp, wp = -(-(h + dy) // 16) * 16, -(-(w + dx) // 16) * 16
    pad = (dx, wp - w - dx, dy, hp - h - dy)
    ycc = F.pad(torch.cat([y, cb, cr], 1), pad, mode="replicate")
    y = _dct_quantise(ycc[:, 0:1], _jpeg_table(_JPEG_LUMA, quality, z.device))
    ch = F.avg_pool2d(ycc[:, 1:3], 2)
    ch = _dct_quantise(ch.reshape(-1, 1, hp // 2, wp // 2), _jpeg_table(_JPEG_CHROMA, quality, z.device))
    ch = F.interpolate(ch.reshape(n, 2, hp // 2, wp // 2), size=(hp, wp), mode="bilinear", align_corners=False)
    y = y[..., dy:dy + h, dx:dx + w] + 128.0
    cb, cr = ch[:, 0:1, dy:dy + h, dx:dx + w], ch[:, 1:2, dy:dy + h, dx:dx + w]
    rgb = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return torch.round(rgb.clamp(0, 255)) / 255.0


def _to_linear(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z <= 0.04045, z / 12.92, ((z.clamp(min=0) + 0.055) / 1.055) ** 2.4)


def _to_srgb(z: torch.Tensor) -> torch.Tensor:
    z = z.clamp(0, 1)
    return torch.where(z <= 0.0031308, 12.92 * z, 1.055 * z.clamp(min=1e-8) ** (1 / 2.4) - 0.055)


def _filter(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``z`` (1, C, H, W) convolved with the 2-D kernel ``k`` (kh, kw; odd sides), reflected edges."""
    kh, kw = k.shape
    c = z.shape[1]
    zp = F.pad(z, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(zp, k.to(z)[None, None].expand(c, 1, kh, kw), groups=c)


def _overlap(box, rect) -> float:
    """The fraction of ``box`` (x0, y0, x1, y1) inside ``rect`` (x0, y0, x1, y1)."""
    w = max(0.0, min(box[2], rect[2]) - max(box[0], rect[0]))
    h = max(0.0, min(box[3], rect[3]) - max(box[1], rect[1]))
    return w * h / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)


def degrade(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, max_ops: int = 3,
            downscale: float = 0.45, blur: float = 0.2, motion_blur: float = 0.1, jpeg: float = 0.3,
            low_light: float = 0.2, colour_cast: float = 0.15, noise: float = 0.2,
            occlusion: float = 0.15, face_px: Sequence[float] = (24, 64), face_frac: float = 0.55,
            blur_sigma: Sequence[float] = (0.5, 2.5), box_blur: float = 0.3,
            motion_px: Sequence[float] = (5, 13), jpeg_quality: Sequence[float] = (20, 60),
            ev: Sequence[float] = (0.5, 2.5), black_lift: Sequence[float] = (0.0, 0.05),
            dark_noise: Sequence[float] = (0.008, 0.03), noise_sigma: Sequence[float] = (0.01, 0.05),
            chroma_noise: float = 0.5,
            cast_gains: Sequence[Sequence[float]] = ((1.0, 0.3, 0.3), (0.3, 0.45, 1.0), (0.35, 1.0, 0.4)),
            cast_strength: Sequence[float] = (0.5, 1.0), cast_lift: Sequence[float] = (0.0, 0.08),
            occlusion_area: Sequence[float] = (0.1, 0.3), margin: float = 0.2,
            return_ops: bool = False):
    """In-the-wild degradations of aligned crops ``x`` (B, 3, S, S) in [-1, 1], per sample;
    same shape, dtype and range. Deterministic given ``gen``'s state; ``p`` <= 0 returns ``x``
    itself without drawing from ``gen``.

    Each sample is degraded with probability ``p``; a degraded sample gets each of
    :data:`DEGRADATIONS` with its own probability (the argument of that name), at most
    ``max_ops`` of them (a random subset of those drawn) and at least one (drawn in proportion to
    the probabilities), applied in the order of DEGRADATIONS:

    occlusion: a rectangle of ``occlusion_area`` of the crop (aspect 1:2 to 2:1), placed so that
        it covers at most one of the eyes and the mouth of the crop template (> 30% of a box of
        0.7 x 0.4 inter-ocular distances around an eye, or around the mouth's corners; of 16
        draws, the first that does, else the one covering fewest), filled with a flat random
        colour or, half the time, with a patch of another sample of the batch (skin, hair,
        background);
    colour_cast: stage light, the sRGB channels times one of ``cast_gains`` mixed with 1 by a
        strength in ``cast_strength``, plus a lift of ``cast_lift`` times the gains (as the
        stress set's red / blue / green, deidcli/research/stress.py);
    low_light: ``ev`` stops less light (in linear light), a black level of ``black_lift`` added
        and sensor noise of ``dark_noise`` (luma; chroma ``chroma_noise`` of it), the noise added
        at the capture resolution (see downscale);
    blur: Gaussian of sigma in ``blur_sigma`` px, or (``box_blur`` of the time) the box of the
        same variance (odd width);
    motion_blur: an anti-aliased line kernel ``motion_px`` long at a random angle;
    downscale: a face of ``face_px`` pixels: the crop (whose face spans ``face_frac`` of it)
        resized to face_px / face_frac px (area or antialiased bilinear), and after the noise and
        JPEG (which a camera adds at that resolution) back up bilinearly, as the pipeline
        upscales a small face's crop;
    noise: Gaussian sensor noise of ``noise_sigma`` (luma; chroma ``chroma_noise`` of it);
    jpeg: :func:`jpeg_approx` at a quality in ``jpeg_quality``, its block grid at a random offset.

    Sigmas, lifts and gains are in [0, 1] units of the 8-bit range. ``return_ops``: also the
    names applied to each sample (a list of B lists)."""
    b, s_in = x.shape[0], x.shape[-1]
    probs = torch.tensor([float(v) for v in (occlusion, colour_cast, low_light, blur, motion_blur,
                                             downscale, noise, jpeg)]).clamp(0, 1)
    if p <= 0 or b == 0 or float(probs.sum()) <= 0:
        return (x, [[] for _ in range(b)]) if return_ops else x

    def u(r) -> float:
        lo, hi = float(r[0]), float(r[1])
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def coin(q) -> bool:
        return float(torch.rand((), generator=gen)) < q

    def randint(n) -> int:
        return int(torch.randint(0, n, (), generator=gen))

    on = torch.rand((b,), generator=gen) < p
    drawn = torch.rand((b, len(probs)), generator=gen) < probs
    rank = torch.where(drawn, torch.rand((b, len(probs)), generator=gen), torch.full((b, len(probs)), 2.0))
    one = torch.multinomial(probs.expand(b, -1), 1, generator=gen)[:, 0]
    ops: list[list[str]] = []
    for i in range(b):
        if not bool(on[i]):
            ops.append([])
            continue
        if not bool(drawn[i].any()):
            keep = [int(one[i])]
        else:
            keep = [int(k) for k in torch.argsort(rank[i])[:max(int(max_ops), 1)] if bool(drawn[i, k])]
        ops.append([DEGRADATIONS[k] for k in sorted(keep)])

    src = (x.detach() + 1) / 2
    out = src.clone()
    kp = None
    for i in range(b):
        todo = ops[i]
        if not todo:
            continue
        z = src[i:i + 1].clone()
        sigma_l = 0.0  # sensor noise (luma) to add at the capture resolution
        if "occlusion" in todo:
            if kp is None:  # boxes (x0, y0, x1, y1) of the eyes and the mouth of the template
                from ...faces.align import crop_template

                t = crop_template(s_in, margin).astype(float)
                iod = float(t[1, 0] - t[0, 0])
                ex, ey, my = 0.35 * iod, 0.2 * iod, (t[3, 1] + t[4, 1]) / 2
                kp = [(e[0] - ex, e[1] - ey, e[0] + ex, e[1] + ey) for e in t[:2]]
                kp.append((t[3, 0] - 0.1 * iod, my - ey, t[4, 0] + 0.1 * iod, my + ey))
            area = u(occlusion_area) * s_in * s_in
            aspect = math.exp(u((math.log(0.5), math.log(2.0))))
            rw = min(max(int(round(math.sqrt(area * aspect))), 2), s_in)
            rh = min(max(int(round(math.sqrt(area / aspect))), 2), s_in)
            best = None
            for _ in range(16):
                x0, y0 = randint(s_in - rw + 1), randint(s_in - rh + 1)
                covered = sum(_overlap(bx, (x0, y0, x0 + rw, y0 + rh)) > 0.3 for bx in kp)
                if best is None or covered < best[0]:
                    best = (covered, x0, y0)
                if covered <= 1:
                    break
            _, x0, y0 = best
            if b > 1 and coin(0.5):
                j = (i + 1 + randint(b - 1)) % b
                sx, sy = randint(s_in - rw + 1), randint(s_in - rh + 1)
                fill = src[j:j + 1, :, sy:sy + rh, sx:sx + rw]
            else:
                fill = torch.rand((1, 3, 1, 1), generator=gen).to(z)
            z[:, :, y0:y0 + rh, x0:x0 + rw] = fill
        if "colour_cast" in todo:
            g = torch.tensor([float(v) for v in cast_gains[randint(len(cast_gains))]]).view(1, 3, 1, 1).to(z)
            t = u(cast_strength)
            z = z * (1 + t * (g - 1)) + t * u(cast_lift) * g
        if "low_light" in todo:
            z = _to_srgb(_to_linear(z.clamp(0, 1)) * 2.0 ** -u(ev)) + u(black_lift)
            sigma_l = u(dark_noise)
        if "blur" in todo:
            sg = u(blur_sigma)
            if coin(box_blur):
                wd = 2 * int(round((math.sqrt(12 * sg * sg + 1) - 1) / 2)) + 1
                k1 = torch.full((wd,), 1.0 / wd)
            else:
                r = int(math.ceil(3 * sg))
                k1 = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sg) ** 2)
                k1 = k1 / k1.sum()
            z = _filter(_filter(z, k1[None, :]), k1[:, None])
        if "motion_blur" in todo:
            ln, th = u(motion_px), u((0.0, math.pi))
            r = int(math.ceil(ln / 2))
            c = torch.arange(-r, r + 1, dtype=torch.float32)
            yy, xx = torch.meshgrid(c, c, indexing="ij")
            along = xx * math.cos(th) + yy * math.sin(th)
            perp = -xx * math.sin(th) + yy * math.cos(th)
            k2 = (1 - perp.abs()).clamp(min=0) * (ln / 2 + 0.5 - along.abs()).clamp(0, 1)
            z = _filter(z, k2 / k2.sum())
        small = None
        if "downscale" in todo:
            side = int(round(u(face_px) / face_frac))
            area_mode = coin(0.5)
            if side < s_in:
                small = side
                z = (F.interpolate(z, size=(side, side), mode="area") if area_mode else
                     F.interpolate(z, size=(side, side), mode="bilinear", antialias=True, align_corners=False))
        if "noise" in todo:
            sigma_l = math.hypot(sigma_l, u(noise_sigma))
        if sigma_l > 0:
            h, w = z.shape[-2:]
            z = z + sigma_l * (torch.randn((1, 1, h, w), generator=gen)
                               + chroma_noise * torch.randn((1, 3, h, w), generator=gen)).to(z)
        if "jpeg" in todo:
            z = jpeg_approx(z, int(round(u(jpeg_quality))), (randint(8), randint(8)))
        if small is not None:
            z = F.interpolate(z.clamp(0, 1), size=(s_in, s_in), mode="bilinear", align_corners=False)
        out[i] = z[0].clamp(0, 1)
    y = (out * 2 - 1).to(x.dtype).contiguous()
    return (y, ops) if return_ops else y
