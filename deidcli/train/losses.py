"""Training losses (Gafni et al. 2019, Sec. 3) and the counter-factual input distortions.

All images are (B, 3, S, S) float RGB in [-1, 1]; masks (B, 1, S, S) in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..identity import MobileFaceNet, crop_to_id_input


def attractor_repeller(idnet: MobileFaceNet, out: torch.Tensor, ref: torch.Tensor,
                       target_desc: torch.Tensor, levels: Sequence[str], margin: float,
                       rep_margin: float = 0.0, level_weights: Sequence[float] | None = None,
                       gen: torch.Generator | None = None, rescale: float = 1.0,
                       attr_src: torch.Tensor | None = None,
                       self_desc: torch.Tensor | None = None, self_weight: float = 0.0,
                       return_maps: bool = False):
    """(attractor, repeller, cos) for generator output ``out`` vs the input ``ref``; with
    ``return_maps`` also (out_maps, ref_maps), the feature maps the attractor compared (out's with
    gradient, ref's without), for :class:`deidcli.model.FeatureDiscriminator`.

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
    [0, 1], e.g. :func:`deidcli.engine.eye_pass_weight`), pushed away from ``target_desc`` (and,
    with ``self_weight``, from ``self_desc``) as in :func:`attractor_repeller`.

    Why: the whole-face repeller can be met by changing the rest of the face while the eyes keep
    their owner's shape, and an independent recognizer (dlib) reads much of the identity from the
    eye band (on lp_d13's crops the input's brows or lids pasted into an output bring it back).
    Measured (weights/MODEL_CARD.md, Schedule, session 22): it lowers this network's eye-band
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

    The box of :func:`deidcli.align.mouth_box`, box-blurred by ``soften`` px so the small warps
    of :func:`augment` move weight, not an edge."""
    from ..align import mouth_box

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

    The eyes with their brows of :func:`deidcli.align.eye_boxes` and the mouth of
    :func:`mouth_weights`, box-blurred by ``soften`` px. ``brows=False``: the eye boxes stop
    0.25 inter-ocular distances above the eye (lids and iris, not the brow): the brows' shape is
    identity (pasting a person's brows into an output lets dlib re-identify it). Measured: the
    lids carry it too, so this alone does not stop the leak (weights/MODEL_CARD.md, session 22)."""
    from ..align import eye_boxes

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
    """(B, C, width/2, width): the eye band (:func:`deidcli.align.eye_band`) of ``x`` (B, C, S, S),
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
