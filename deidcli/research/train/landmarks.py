"""A differentiable copy of deid's face detector, for a landmark-keeping training loss.

The detector deid runs (SCRFD 2.5G with 5 keypoints, ``../shared/models/det_scrfd_2.5g_kps.onnx``)
exists only as ONNX. :class:`OnnxGraph` runs that graph with torch operations, so gradients
flow from its keypoint outputs back to the image; :class:`Keypoints` decodes them the way
InsightFace's ``SCRFD.forward`` does; :func:`landmark_loss` is the 5-point displacement of the
generator's output against its input, in units of the input's inter-ocular distance: the
quantity ``deid evaluate`` reports as ``landmark_disp_iod``, made a loss.

Why not onnx2torch: it imports torchvision, and torchvision's PyPI wheels pin a torch release
whose unpinned install is the multi-GB CUDA build (installing onnx2torch here replaced
torch 2.13.0+cpu by 2.14.1+cu130). The graph uses 15 operator types; they are below, and
``tests/test_train.py`` checks the result against ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..measures import PAD  # grey border around the crop: the one deid evaluate's detect_crops uses

STRIDES = (8, 16, 32)
ANCHORS = 2  # anchors per location and stride (SCRFD *_kps)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraph(nn.Module):
    """Run an ONNX graph (the op subset of the SCRFD detectors) with torch ops.

    Initializers become frozen buffers. Input and outputs as the ONNX graph defines them; the
    batch dimension may be larger than the exported 1 (see :class:`Keypoints` for how the
    detector's flattened outputs are put back per image)."""

    OPS = {"Conv", "Relu", "Add", "Mul", "Sigmoid", "Transpose", "Reshape", "Shape", "Gather",
           "Unsqueeze", "Slice", "Concat", "Resize", "AveragePool", "MaxPool"}

    def __init__(self, path: os.PathLike):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(path))
        self._names: dict[str, str] = {}
        for i, init in enumerate(m.graph.initializer):
            key = f"c{i}"
            self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(init).copy()),
                                 persistent=False)
            self._names[init.name] = key
        self.input_name = next(i.name for i in m.graph.input if i.name not in self._names)
        self.output_names = [o.name for o in m.graph.output]
        self.nodes = []
        for n in m.graph.node:
            if n.op_type not in self.OPS:
                raise NotImplementedError(f"{Path(path).name}: ONNX op {n.op_type} not supported")
            self.nodes.append((n.op_type, list(n.input), list(n.output), _attrs(n)))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        env = {name: getattr(self, key) for name, key in self._names.items()}
        env[self.input_name] = x
        env[""] = None
        for op, ins, outs, a in self.nodes:
            v = [env[i] for i in ins]
            env[outs[0]] = self._run(op, v, a)
        return [env[o] for o in self.output_names]

    @staticmethod
    def _run(op: str, v: list, a: dict):
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            assert pads[:2] == pads[2:], "asymmetric padding"
            return F.conv2d(v[0], v[1], v[2] if len(v) > 2 else None, a.get("strides", 1),
                            pads[:2], a.get("dilations", 1), a.get("group", 1))
        if op == "Relu":
            return F.relu(v[0])
        if op == "Add":
            return v[0] + v[1]
        if op == "Mul":
            return v[0] * v[1]
        if op == "Sigmoid":
            return torch.sigmoid(v[0])
        if op == "Transpose":
            return v[0].permute(*a["perm"])
        if op == "Reshape":
            return v[0].reshape([int(s) for s in v[1]])
        if op == "Shape":
            return torch.tensor(v[0].shape, dtype=torch.int64)
        if op == "Gather":
            # shape arithmetic: Shape gives CPU tensors, the index is a buffer on the model's device
            idx = v[1].to(v[0].device)
            return torch.index_select(v[0], a.get("axis", 0), idx.reshape(-1)).reshape(idx.shape)
        if op == "Unsqueeze":
            y = v[0]
            for ax in sorted(a["axes"]):
                y = y.unsqueeze(ax)
            return y
        if op == "Slice":
            data, starts, ends = v[0], v[1], v[2]
            axes = v[3] if len(v) > 3 and v[3] is not None else torch.arange(len(starts))
            y = data
            for s, e, ax in zip(starts.tolist(), ends.tolist(), axes.tolist()):
                y = y.narrow(ax, s, min(e, y.shape[ax]) - s)
            return y
        if op == "Concat":
            return torch.cat(v, a.get("axis", 0))
        if op == "Resize":
            assert a.get("mode", b"nearest") == b"nearest"
            sizes = [int(s) for s in v[3]]
            return F.interpolate(v[0], size=sizes[2:], mode="nearest")
        if op == "AveragePool":
            k, s = a["kernel_shape"], a.get("strides", a["kernel_shape"])
            return F.avg_pool2d(v[0], k, s, a.get("pads", [0, 0])[:2], bool(a.get("ceil_mode", 0)),
                                bool(a.get("count_include_pad", 0)))
        if op == "MaxPool":
            k, s = a["kernel_shape"], a.get("strides", a["kernel_shape"])
            return F.max_pool2d(v[0], k, s, a.get("pads", [0, 0])[:2], ceil_mode=bool(a.get("ceil_mode", 0)))
        raise NotImplementedError(op)


class Keypoints(nn.Module):
    """SCRFD scores and decoded 5-point keypoints for aligned face crops, differentiable.

    forward(x): x (B, 3, S, S) float RGB in [-1, 1] (the generator's range), S a multiple of 32.
    The crop is put on a grey canvas with a ``PAD`` border (as ``deid evaluate`` detects on
    crops) and normalised as InsightFace does ((RGB uint8 - 127.5) / 128 = x * 127.5 / 128).
    Returns scores (B, N) in [0, 1] and keypoints (B, N, 5, 2) in crop pixels (x, y), one row
    per anchor of the three strides (N = sum over strides of (S + 2 PAD)^2 / stride^2 * 2).
    """

    def __init__(self, path: os.PathLike, pad: int = PAD):
        super().__init__()
        self.graph = OnnxGraph(path)
        self.pad = pad
        self._centres: dict = {}

    def centres(self, side: int, device) -> list[torch.Tensor]:
        key = (side, str(device))
        if key not in self._centres:
            cs = []
            for st in STRIDES:
                n = side // st
                yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                c = torch.stack([xx, yy], -1).reshape(-1, 1, 2).float() * st
                cs.append(c.repeat(1, ANCHORS, 1).reshape(-1, 2).to(device))
            self._centres[key] = cs
        return self._centres[key]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, s, _ = x.shape
        side = s + 2 * self.pad
        y = F.pad(x * (127.5 / 128.0), (self.pad,) * 4, value=0.0)
        outs = self.graph(y)
        nf = len(STRIDES)
        scores, kps = [], []
        for i, (st, c) in enumerate(zip(STRIDES, self.centres(side, x.device))):
            n = side // st
            # the graph flattens (H, W, B, anchors * k) into rows of k
            sc = outs[i].reshape(n, n, b, ANCHORS).permute(2, 0, 1, 3).reshape(b, -1)
            kp = outs[i + 2 * nf].reshape(n, n, b, ANCHORS, 10).permute(2, 0, 1, 3, 4).reshape(b, -1, 5, 2)
            scores.append(sc)
            kps.append(c[None, :, None, :] + kp * st - self.pad)
        return torch.cat(scores, 1), torch.cat(kps, 1)


def landmark_loss(det: Keypoints, out: torch.Tensor, ref: torch.Tensor, top: int = 4) -> torch.Tensor:
    """Mean 5-point displacement of ``out`` against ``ref`` (both (B, 3, S, S) in [-1, 1]),
    in units of ref's inter-ocular distance. The anchors are ref's ``top`` best (their scores,
    normalised, weight them); out's keypoints are read at the same anchors, so the loss moves
    out's landmarks, not which anchor wins."""
    with torch.no_grad():
        s_ref, k_ref = det(ref)
        w, idx = s_ref.topk(top, dim=1)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-6)
        g = idx[:, :, None, None].expand(-1, -1, 5, 2)
        k_ref = k_ref.gather(1, g)
        iod = (k_ref[:, :, 1] - k_ref[:, :, 0]).norm(dim=-1).clamp_min(4.0)  # (B, top)
    _, k_out = det(out)
    k_out = k_out.gather(1, g)
    d = (k_out - k_ref).norm(dim=-1).mean(-1) / iod  # (B, top)
    return (w * d).sum(1).mean()
