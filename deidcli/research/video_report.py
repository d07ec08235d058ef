"""deid evaluate-video's report: the contact strip of exposed faces and the markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .measures import UNCHANGED_MAD, VERIFY_THRESHOLD

#: Strip: frames shown and total width in pixels.
STRIP_FRAMES = 6

STRIP_WIDTH = 1200


_TILE_W = STRIP_WIDTH // STRIP_FRAMES


def _thumb(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    return cv2.resize(img, (_TILE_W, max(1, round(h * _TILE_W / w))), interpolation=cv2.INTER_AREA)


def _write_strip(path: Path, strip: dict, exposed: list, confirmed: set, title: str,
                 garish: Sequence = ()) -> None:
    """Rows: input frames, output frames (face boxes: green anonymized, red exposed, orange garish,
    grey unconfirmed), the input and output ArcFace crops of the first face of each frame with their
    cosine; then, if any, the input and output crops of the first exposed faces, and of the first
    garish faces (``garish``: (track, index, in112, out112, reason)) labelled with the reason."""
    import cv2

    from ..media.images import write_image

    if not strip:
        return
    W = _TILE_W * STRIP_FRAMES
    font = cv2.FONT_HERSHEY_SIMPLEX

    def label(img, x, text, color=(255, 255, 0)):
        cv2.putText(img, text, (x + 3, 14), font, 0.45, color, 1)

    red, orange, yellow = (255, 0, 0), (255, 160, 0), (255, 255, 0)

    def face_rows(faces):
        """faces: (frame index, input crop, output crop, label under the output, its colour)."""
        rows = [np.zeros((_TILE_W, W, 3), np.uint8) for _ in range(2)]
        for c, (i, a, b, text, color) in enumerate(faces[:STRIP_FRAMES]):
            x = c * _TILE_W
            rows[0][:, x:x + _TILE_W] = cv2.resize(a, (_TILE_W, _TILE_W), interpolation=cv2.INTER_CUBIC)
            rows[1][:, x:x + _TILE_W] = cv2.resize(b, (_TILE_W, _TILE_W), interpolation=cv2.INTER_CUBIC)
            label(rows[0], x, f"frame {i}")
            label(rows[1], x, text, color)
        return rows

    def cos_label(i, a, b, cos, exp, reason):
        text = f"cos {cos:.2f}{' EXPOSED' if exp else ''}{' GARISH ' + reason if reason else ''}"
        return i, a, b, text, red if exp else orange if reason else yellow

    idx = sorted(strip)[:STRIP_FRAMES]
    th = max(strip[i][0].shape[0] for i in idx)
    frames = [np.zeros((th, W, 3), np.uint8) for _ in range(2)]
    firsts = []
    for c, i in enumerate(idx):
        tin, tout, crops, boxes, width = strip[i]
        s = _TILE_W / width
        tout = tout.copy()
        state = {t: (e, r) for t, _, _, _, e, r in crops}
        for t, b in boxes:
            e, r = state.get(t, (False, ""))
            color = (128, 128, 128) if t not in confirmed else red if e else orange if r else (0, 255, 0)
            cv2.rectangle(tout, (int(b[0] * s), int(b[1] * s)), (int(b[2] * s), int(b[3] * s)), color, 1)
        x = c * _TILE_W
        frames[0][:tin.shape[0], x:x + _TILE_W] = tin
        frames[1][:tout.shape[0], x:x + _TILE_W] = tout
        label(frames[0], x, f"{i}")
        first = next((cos_label(i, a, b, cos, e, r) for t, a, b, cos, e, r in crops if t in confirmed), None)
        blank = np.zeros((112, 112, 3), np.uint8)
        firsts.append(first or (i, blank, blank, "", yellow))
    parts = [frames[0], frames[1]] + face_rows(firsts)
    caption = "rows: input, output, input face, output face"
    exp = [cos_label(i, a, b, cos, True, "") for t, i, a, b, cos in exposed if t in confirmed]
    if exp:
        head2 = np.zeros((20, W, 3), np.uint8)
        label(head2, 0, f"first exposed faces ({len(exp)} shown of the first ones found): input, output",
              (255, 80, 80))
        parts += [head2] + face_rows(exp)
    seen: dict = {}  # the first garish face of each track first, then the second ones
    ranked = []
    for n, (t, i, a, b, reason) in enumerate(g for g in garish if g[0] in confirmed):
        seen[t] = seen.get(t, 0) + 1
        ranked.append((seen[t], n, (i, a, b, f"GARISH {reason}", orange)))
    gar = [g for _, _, g in sorted(ranked, key=lambda x: x[:2])]
    if gar:
        head3 = np.zeros((20, W, 3), np.uint8)
        label(head3, 0, f"first garish faces ({min(len(gar), STRIP_FRAMES)} shown, reason under each): "
                        "input, output", (255, 160, 0))
        parts += [head3] + face_rows(gar)
    head = np.zeros((20, W, 3), np.uint8)
    label(head, 0, f"{title}  ({caption})", (255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.vstack([head] + parts))


def _f(v, fmt: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, fmt)


def _ci(v: Optional[list]) -> str:
    return "" if not v else f" ({v[0]:.2f}-{v[1]:.2f})"


def _garish_cell(r: dict) -> str:
    if r.get("garish_frac") is None:
        return "-"
    return f"{r['garish_faces']} ({100 * r['garish_frac']:.1f}%)"


def _frames_list(v: list, limit: int = 12) -> str:
    if not v:
        return "0"
    s = ", ".join(str(x) for x in v[:limit])
    return f"{len(v)}: {s}{', ...' if len(v) > limit else ''}"


def to_markdown(results) -> str:
    """Markdown tables (one row per clip, then one per track) for one result dict or a list."""
    if isinstance(results, dict):
        results = [results]
    cols = ["clip", "frames", "faces", "tracks", "unconf.", "small", "exposed frames", "cos mean", "cos max",
            "verified", "flicker in", "flicker out", "ratio", "emb var in", "emb var out",
            "lm disp %IOD", "lm found", "mouth r", "lips r", "eyes r", "garish", "colour/blotch/lost",
            "generated", "blurred", "pixelated"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        out.append("| " + " | ".join([
            Path(r["input"]).name, str(r["frames"]), str(r["faces"]), str(r["tracks"]),
            str(len(r["unconfirmed_tracks"])), str(r["faces_below_min_face"]), _frames_list(r["exposed_frames"]), _f(r["cos_mean"]),
            _f(r["cos_max"]), _f(r["verified_frac"]), _f(r["flicker_in"], ".2f"), _f(r["flicker_out"], ".2f"),
            _f(r["flicker_ratio"], ".2f"), _f(r["embvar_in"], ".4f"), _f(r["embvar_out"], ".4f"),
            _f(r["landmark_disp_iod_pct"], ".1f"), _f(r["landmark_found_frac"], ".2f"), _f(r["mouth_corr"], ".2f"),
            _f(r.get("lips_corr"), ".2f"), _f(r.get("eyes_corr"), ".2f"), _garish_cell(r),
            "/".join(str(r.get(f"garish_{k}", 0)) for k in ("colour", "blotch", "lost")),
            *(str(r.get(f"faces_{k}", "-")) for k in ("generated", "blurred", "pixelated")),
        ]) + " |")
    tcols = ["clip", "track", "frames", "faces", "interp", "exposed frames", "cos mean", "cos max", "verified",
             "flicker ratio", "emb var out/in", "lm disp %IOD", "mouth sd in", "mouth r", "lips sd in", "lips r",
             "eyes in/out", "eyes sd in", "eyes r", "garish", "blurred", "pixelated"]
    out += ["", "| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols)]
    for r in results:
        for t in r["per_track"]:
            ev = None if not t["embvar_in"] or t["embvar_out"] is None else t["embvar_out"] / t["embvar_in"]
            out.append("| " + " | ".join([
                Path(r["input"]).name, str(t["track"]), f"{t['first_frame']}-{t['last_frame']}", str(t["faces"]),
                str(t["interpolated"]), _frames_list(t["exposed_frames"]), _f(t["cos_mean"]), _f(t["cos_max"]),
                _f(t["verified_frac"]), _f(t["flicker_ratio"], ".2f"), _f(ev, ".2f"),
                _f(t["landmark_disp_iod_pct"], ".1f"), _f(t["mouth_in_std"], ".3f"), _f(t["mouth_corr"], ".2f"),
                _f(t.get("lips_in_std"), ".3f"), _f(t.get("lips_corr"), ".2f") + _ci(t.get("lips_corr_ci90")),
                (f"{_f(t.get('eyes_in_mean'))}/{_f(t.get('eyes_out_mean'))}" if t.get("eyes_in_mean") is not None
                 else "-"),
                _f(t.get("eyes_in_std"), ".3f"), _f(t.get("eyes_corr"), ".2f") + _ci(t.get("eyes_corr_ci90")),
                _garish_cell(t), str(t.get("faces_blurred", "-")), str(t.get("faces_pixelated", "-")),
            ]) + " |")
    sized = [r for r in results if r.get("garish_by_size")]
    if sized:
        names = list(sized[0]["garish_by_size"])
        out += ["", "| clip | " + " | ".join(f"{b} px: faces, garish, fallback" for b in names) + " |",
                "|" + "---|" * (len(names) + 1)]
        for r in sized:
            out.append(f"| {Path(r['input']).name} | " + " | ".join(
                "-" if not c["faces"]
                else f"{c['faces']}, {100 * c['garish_frac']:.1f}%, {100 * c['fallback_frac']:.1f}%"
                for c in r["garish_by_size"].values()) + " |")
    judged = [(r, t) for r in results for t in r["per_track"] if t.get("judge_faces")]
    if judged:
        from .judges import DLIB_SAME_DISTANCE

        name = judged[0][0]["settings"].get("judge")
        out += ["", f"| clip | track | faces judged | {name} distance mean | min | "
                    f"same person (< {DLIB_SAME_DISTANCE:g}) | of them, also without the face |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {Path(r['input']).name} | {t['track']} | {t['judge_faces']} | {t['judge_dist_mean']:.3f} | "
                f"{t['judge_dist_min']:.3f} | {t['judge_same_frac']:.3f} | {t.get('judge_same_context_frac', 0):.3f} |"
                for r, t in judged]
    thr = results[0]["settings"]["verify_threshold"] if results else VERIFY_THRESHOLD
    out += ["", f"Exposed: output face verified as the input person (cosine >= {thr:.4f}, FAR 0.1% on LFW) "
                f"or unchanged (ArcFace crop MAD < {UNCHANGED_MAD:g}). Flicker: mean |crop(t) - crop(t-1)| "
                "(0-255) at the input's landmarks; mouth r: jaw-drop proxy, lips r: inner-lip opening (dlib 68 "
                "points; '-' when not installed or the input's lips barely move), eyes: lid opening from the "
                "same fit (in/out: mean opening in IOD; r: across frames, '-' when the input's eyes barely move; "
                "no target), in brackets its 90% "
                "interval over block-bootstrap resamples of the track's frames (1 s blocks); targets: 0 exposed, "
                "ratio <= 1.3, lips r (or mouth r without dlib) >= 0.9. A clip against its own plain re-encode "
                "(examples/reencode_floor.sh) gives the noise floor of these figures.",
            "", "Garish (faces, % of the faces; deidcli/research/garish.py): a generated output face with colours "
                "the input face does not have (colour: e.g. a yellow nose under red light, pink paint under "
                "blue light), black or white blotches (blotch), or that the detector no longer finds while "
                "the input's was confident (lost, faces >= 40 px). Blurred / pixelated: faces obscured by "
                "deid's fallback methods (little detail at the face's scale, resp. block edges; colour kept), "
                "not judged garish. By size: face box height bins; fallback = blurred + pixelated."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Command line (registered in cli.py)
