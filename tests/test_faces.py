"""Tests of deidcli.faces: the tracker on synthetic detections, the detector and the
tracker on real footage from ../shared (skipped when it is missing)."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import decode_rgb
from deidcli.errors import ModelError
from deidcli.faces.detect import Detections, Detector, box_iou
from deidcli.faces.track import Face, Tracker
from deidcli.options import TrackOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "det_scrfd_2.5g_kps.onnx"
MODEL_500M = SHARED / "models" / "det_scrfd_500m_kps_640.onnx"
VIDEO = SHARED / "videos" / "ghost_2person.mp4"
N_VIDEO_FRAMES = 60

# --------------------------------------------------------------------------------------
# Synthetic detections


def face_at(cx: float, cy: float, size: float = 100.0):
    """Box (4,) and plausible landmarks (5, 2) of a frontal face centred at (cx, cy)."""
    box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    offsets = np.array([[-0.2, -0.12], [0.2, -0.12], [0.0, 0.05], [-0.16, 0.22], [0.16, 0.22]])
    return box, np.array([cx, cy]) + offsets * size


def dets_of(faces: list, scores=None) -> Detections:
    """Detections from a list of (box, kps)."""
    if not faces:
        return Detections.empty()
    scores = np.full(len(faces), 0.9) if scores is None else scores
    return Detections(
        np.stack([b for b, _ in faces]), np.asarray(scores), np.stack([k for _, k in faces])
    )


def run(tracker: Tracker, frames: list[Detections]) -> list[tuple[int, list[Face]]]:
    """Push every frame, flush, and check each frame comes back exactly once, in order."""
    out = []
    o = tracker.options
    # The tracker lags by at most max_gap frames, or reach_back while weak detections may still
    # start a track (only with a start threshold).
    lag = max(o.max_gap + 1, o.reach_back) if tracker.start_thresh > 0 else o.max_gap
    for i, d in enumerate(frames):
        got = tracker.push(i, d)
        assert out + got == [] or (out + got)[-1][0] >= i - lag
        out += got
    out += tracker.flush()
    assert [i for i, _ in out] == list(range(len(frames)))
    assert tracker.max_buffered <= lag + 1
    return out


def by_track(out) -> dict[int, list[tuple[int, Face]]]:
    tracks: dict[int, list[tuple[int, Face]]] = {}
    for i, faces in out:
        ids = [f.track_id for f in faces]
        assert ids == sorted(set(ids)), "one face per track per frame, sorted by id"
        for f in faces:
            assert f.box.shape == (4,) and f.box.dtype == np.float32
            assert f.kps.shape == (5, 2) and f.kps.dtype == np.float32
            tracks.setdefault(f.track_id, []).append((i, f))
    return tracks


def two_faces(n=20, miss_a=(), speed=4.0):
    """A moves right along y=100, B moves left along y=300; A missed on `miss_a`."""
    frames, truth_a = [], []
    for i in range(n):
        a = face_at(100 + speed * i, 100)
        b = face_at(600 - speed * i, 300)
        truth_a.append(a)
        frames.append(dets_of([b] if i in miss_a else [a, b]))  # B first: order is no hint
    return frames, truth_a


NO_SMOOTH = TrackOptions(smooth=0.0)


def test_gap_inside_track_is_interpolated():
    frames, truth_a = two_faces(miss_a={5, 6, 7})
    tracker = Tracker(NO_SMOOTH)
    tracks = by_track(run(tracker, frames))
    assert sorted(tracks) == [0, 1] and tracker.n_tracks == 2
    a_id = tracks[0][0][1].track_id if tracks[0][0][1].box[1] < 200 else 1
    a = tracks[a_id]
    assert [i for i, _ in a] == list(range(20)), "A is output in every frame, one track"
    for i, f in a:
        assert f.interpolated == (i in {5, 6, 7})
        if f.interpolated:
            assert f.score == 0.0
            lo, hi = a[4][1].box, a[8][1].box
            assert np.all(f.box > np.minimum(lo, hi) - 1e-3)
            assert np.all(f.box < np.maximum(lo, hi) + 1e-3)
        # Linear motion: interpolation is exact (smoothing is off).
        np.testing.assert_allclose(f.box, truth_a[i][0], atol=1e-3)
        np.testing.assert_allclose(f.kps, truth_a[i][1], atol=1e-3)
    assert tracker.n_interpolated == 3
    assert not any(f.interpolated for _, f in tracks[1 - a_id])


def test_gap_filled_with_smoothing_on_too():
    frames, truth_a = two_faces(miss_a={5, 6, 7})
    tracker = Tracker(TrackOptions(), fps=30)
    tracks = by_track(run(tracker, frames))
    assert len(tracks) == 2
    a = next(t for t in tracks.values() if t[0][1].box[1] < 200)
    assert [i for i, f in a if f.interpolated] == [5, 6, 7]
    for i, f in a:  # smoothed, so not exact, but close to the truth
        assert box_iou(f.box, truth_a[i][0])[0, 0] > 0.8


def test_ids_do_not_swap_when_faces_cross():
    # A goes right, B goes left, 0.3 face sizes apart vertically: the boxes overlap
    # heavily while they pass, and A is missed right at the crossing.
    n, size, speed = 40, 100.0, 20.0
    frames, truth = [], {}
    rng = np.random.default_rng(1)
    for i in range(n):
        a = face_at(100 + speed * i, 200, size)
        b = face_at(100 + speed * (n - 1 - i), 230, size)
        truth[i] = (a, b)
        faces = [b] if 18 <= i <= 20 else [a, b]
        rng.shuffle(faces)
        frames.append(dets_of(faces))
    assert box_iou(truth[19][0][0], truth[19][1][0])[0, 0] > 0.35
    tracker = Tracker(TrackOptions(smooth=0.0))
    tracks = by_track(run(tracker, frames))
    assert sorted(tracks) == [0, 1], f"{tracker.n_tracks} tracks for 2 faces"
    for tid, track in tracks.items():
        which = 0 if np.allclose(track[0][1].box, truth[0][0][0]) else 1
        assert [i for i, _ in track] == list(range(n))
        for i, f in track:
            np.testing.assert_allclose(f.box, truth[i][which][0], atol=1e-3)
    assert tracker.n_interpolated == 3


def test_assignment_is_global_not_greedy():
    # A row of touching faces; the camera jerks 0.6 face sizes to the right in one frame.
    # Each new box overlaps its right-hand neighbour's track more (IoU 0.43) than its own
    # (0.25): greedy matching shifts every identity by one, the optimal one does not.
    frames = []
    for i in range(10):
        shift = 60.0 if i >= 5 else 0.0
        frames.append(dets_of([face_at(100 * k + shift, 300) for k in range(3)]))
    assert box_iou(frames[4].boxes[1], frames[5].boxes[0])[0, 0] > 0.4
    tracker = Tracker(NO_SMOOTH)
    tracks = by_track(run(tracker, frames))
    assert sorted(tracks) == [0, 1, 2]
    for tid, track in tracks.items():
        assert len(track) == 10
        assert track[-1][1].box[0] - track[0][1].box[0] == pytest.approx(60.0)


@pytest.mark.parametrize("jump, n_tracks", [(70.0, 1), (110.0, 2)])
def test_fast_motion_centre_gate(jump, n_tracks):
    # A jump of 0.7 face sizes leaves IoU 0.18 < iou_thresh: the centre-distance gate
    # still continues the track. Past the gate (1.1 sizes, no overlap) a new track starts.
    frames = [dets_of([face_at(300 + (jump if i >= 5 else 0.0), 300)]) for i in range(10)]
    assert box_iou(frames[4].boxes, frames[5].boxes)[0, 0] < TrackOptions().iou_thresh
    tracker = Tracker(TrackOptions())
    run(tracker, frames)
    assert tracker.n_tracks == n_tracks


def test_a_fast_small_face_is_one_track_from_its_first_frame():
    """A face moving 0.9 face sizes a frame from its first detection on (the stress set's
    crowd_4k: a 26 px face, 18 px right and 14 down a frame). Its second detection has no overlap
    with the first and lies past CENTRE_GATE, and a track seen once has no speed yet: YOUNG_GATE
    lets it continue, and from then on its predicted box is close. Before, every frame started a
    new track of one detection, and the frames between them went out as they were."""
    from deidcli.faces.track import CENTRE_GATE, YOUNG_GATE

    step = np.array([18.0, 14.0])
    frames = [dets_of([face_at(*(np.array([300.0, 300.0]) + step * i), 26)]) for i in range(12)]
    assert box_iou(frames[0].boxes, frames[1].boxes)[0, 0] < TrackOptions().iou_thresh
    assert CENTRE_GATE < float(np.hypot(*step)) / 26 < YOUNG_GATE
    tracker = Tracker(TrackOptions())
    out = run(tracker, frames)
    assert tracker.n_tracks == 1 and all(len(faces) == 1 for _, faces in out if _ < 12)


def test_a_running_face_seen_weakly_is_one_track_over_every_frame():
    """A 53 px face running 1.6 face sizes a frame (the stress set's crowd_4k: a woman crossing
    the frame, 80-85 px a frame), which the detector scores under the start threshold in some
    frames. YOUNG_GATE links her second detection to her first; from then on her speed is known.
    At 1.5 face sizes, each detection started a track of its own and the weak ones (0.32-0.42)
    none: those frames went out as they were."""
    from deidcli.faces.track import CENTRE_GATE, YOUNG_GATE

    step = np.array([82.0, 0.0])
    scores = [0.84, 0.32, 0.64, 0.55, 0.42, 0.73, 0.32, 0.7, 0.33, 0.35, 0.69, 0.63]
    frames = [dets_of([face_at(*(np.array([300.0, 300.0]) + step * i), 53)], np.array([s]))
              for i, s in enumerate(scores)]
    assert CENTRE_GATE < 82 / 53 < YOUNG_GATE
    tracker = Tracker(TrackOptions(), start_thresh=0.5)
    out = run(tracker, frames)
    assert tracker.n_tracks == 1
    for i, faces in out:
        seen = [f for f in faces if not f.held]
        assert len(seen) == 1 and abs(seen[0].box[0] - (300 - 26.5 + 82 * i)) < 10, (i, faces)


def test_gap_longer_than_max_gap_splits_and_is_not_filled():
    max_gap = 4
    opts = TrackOptions(max_gap=max_gap, smooth=0.0)
    face = face_at(300, 300)
    for gap, n_tracks in [(max_gap, 1), (max_gap + 1, 2)]:
        frames = [dets_of([face])] * 10 + [Detections.empty()] * gap + [dets_of([face])] * 5
        tracker = Tracker(opts)
        out = run(tracker, frames)
        assert tracker.n_tracks == n_tracks
        gap_faces = [f for i, faces in out for f in faces if 10 <= i < 10 + gap]
        if n_tracks == 1:
            assert len(gap_faces) == gap and all(f.interpolated for f in gap_faces)
        else:
            assert gap_faces == [] and tracker.n_interpolated == 0
            assert {f.track_id for i, faces in out for f in faces if i >= 10 + gap} == {1}


def test_track_end_and_one_frame_detections():
    face, spurious = face_at(300, 300), face_at(800, 300, 40)
    frames = [dets_of([face])] * 10 + [Detections.empty()] * 12
    frames[15] = dets_of([spurious])  # a lone detection far from the ended track
    tracker = Tracker(TrackOptions(max_gap=8, pad=0))
    out = run(tracker, frames)
    counts = [len(faces) for _, faces in out]
    # Nothing invented after the track's last detection; the one-frame face is output.
    assert counts == [1] * 10 + [0] * 5 + [1] + [0] * 6
    assert [f.track_id for f in out[15][1]] == [1]
    assert not out[15][1][0].interpolated and out[15][1][0].score == pytest.approx(0.9)
    assert tracker.n_interpolated == 0


def test_small_and_edge_cut_tracks_are_padded_and_held():
    """TrackOptions.pad: a small face (under PAD_BELOW px) or one cut by the frame's border is held
    over pad frames before its first and after its last detection (marked held, counted in
    n_predicted); a large face inside the frame is not; padding never reaches past the video."""
    from deidcli.faces.track import PAD_BELOW

    big, small, edge = face_at(600, 300, 120), face_at(300, 300, PAD_BELOW - 10), face_at(1240, 300, 120)
    assert edge[0][2] > 1280 - 12  # the premise: cut by the right border
    frames = [Detections.empty()] * 3 + [dets_of([big, small, edge])] * 4 + [Detections.empty()] * 12
    frames[-1] = dets_of([big])  # a face on the last frame: no frame after it to pad
    tracker = Tracker(TrackOptions(max_gap=8, pad=2))
    tracker.frame_size = (1280, 720)
    out = run(tracker, frames)
    assert [i for i, _ in out] == list(range(len(frames)))
    held = {i: sorted(f.track_id for f in faces if f.held) for i, faces in out}
    seen = {i: sorted(f.track_id for f in faces if not f.held) for i, faces in out}
    assert seen[3] == seen[6] == [0, 1, 2] and seen[7] == []
    assert held[0] == held[7 + 2] == []  # pad frames, no more
    for i in (1, 2, 7, 8):
        assert held[i] == [1, 2], (i, held)  # the small and the edge-cut face; not the big one
    assert all(f.interpolated and f.score == 0.0 for i in (1, 8) for f in out[i][1])
    assert tracker.n_predicted == 8 and held[len(frames) - 1] == []
    # the last box moves on at the track's speed: a face leaving through the border keeps going
    moving = [dets_of([face_at(1200 + 20 * i, 300, 100)]) for i in range(4)] + [Detections.empty()] * 10
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1280, 720)
    out = run(tracker, moving)
    xs = [f.box[0] for i in (4, 5) for f in out[i][1] if f.held]
    assert xs == [pytest.approx(moving[3].boxes[0, 0] + 20), pytest.approx(moving[3].boxes[0, 0] + 40)]


def test_a_face_coming_in_through_the_border_is_held_where_it_was():
    """A face first found inside the frame but moving out of the border's way (it came in through
    it: its first box moved back one step is cut by the border) is held the frame before its first
    detection, at its first box moved back at its speed, once its second detection gives that speed;
    a padded face's lead moves back the same way. A face moving along inside the frame is not held."""
    def frames_of(xs, size=100.0, y=300.0):
        return [Detections.empty()] * 3 + [dets_of([face_at(x, y, size)]) for x in xs] + [Detections.empty()] * 6

    # stress set crowd_4k: first found 28 px inside the right border, coming in at 0.7 sizes a frame
    coming = frames_of([1280 - 50 - 28 - 70 * i for i in range(4)])
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1280, 720)
    out = run(tracker, coming)
    held = {i: [f for f in faces if f.held] for i, faces in out}
    assert len(held[2]) == 1 and held[1] == []  # one frame back: the earlier one was already out
    assert held[2][0].box[0] == pytest.approx(coming[3].boxes[0, 0] + 70)  # where the face was
    # a small (padded) face: its lead moves back along its speed too
    small = frames_of([600 + 10 * i for i in range(4)], size=40.0)
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1280, 720)
    out = run(tracker, small)
    xs = {i: f.box[0] for i, faces in out for f in faces if f.held and i < 3}
    assert xs[2] == pytest.approx(small[3].boxes[0, 0] - 10)  # the frame before: moved back
    assert xs[1] == pytest.approx(small[3].boxes[0, 0])  # returned before the speed was known
    # along the frame, away from its border: not held
    along = frames_of([400 + 70 * i for i in range(4)])
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1280, 720)
    assert not any(f.held for _, faces in run(tracker, along) for f in faces)


@pytest.mark.parametrize("pad", [0, 2])
def test_random_stream_invariants(pad):
    # Faces come and go, with misses; every frame comes back once, in order, with the
    # lag bound; tracks start and end on detected frames (held faces only before and after
    # those, pad at most); ids are 0..n_tracks-1.
    rng = np.random.default_rng(0)
    max_gap = 5
    frames = []
    for i in range(200):
        faces = []
        for k in range(4):  # four lanes, each face present in some periods
            if (i // (30 + 7 * k) + k) % 2 == 0 and rng.random() > 0.25:
                faces.append(face_at(150 + 250 * k + 2 * np.sin(i / 5), 300 + i, 80))
        if rng.random() < 0.05:
            faces.append(face_at(rng.uniform(0, 1000), 50, 30))  # one-frame false positive
        frames.append(dets_of(faces, rng.uniform(0.5, 1.0, len(faces))))
    tracker = Tracker(TrackOptions(max_gap=max_gap, pad=pad), fps=25)
    tracker.frame_size = (1280, 720)
    out = run(tracker, frames)
    tracks = by_track(out)
    assert sorted(tracks) == list(range(tracker.n_tracks))
    for track in tracks.values():
        assert [i for i, _ in track] == list(range(track[0][0], track[-1][0] + 1))
        kept = [f for _, f in track if not f.held]
        assert len(track) - len(kept) <= 2 * pad
        assert not kept[0].interpolated and not kept[-1].interpolated
        assert all(not f.held for _, f in track[pad:len(track) - pad])
    n_det = sum(len(d) for d in frames)
    n_out = sum(len(faces) for _, faces in out)
    assert n_out == n_det + tracker.n_interpolated + tracker.n_predicted and tracker.n_interpolated > 0
    assert (tracker.n_predicted > 0) == (pad > 0)


def test_smoothing_cuts_jitter_of_a_still_face():
    # Landmark noise of 1 % of the face size (SCRFD's on the shared clips: 0.3-0.5 %).
    rng = np.random.default_rng(0)
    box, kps = face_at(400, 300, 100)
    frames = [
        dets_of([(box + rng.normal(0, 1.0, 4), kps + rng.normal(0, 1.0, (5, 2)))])
        for _ in range(150)
    ]

    def jitter(opts):
        track = by_track(run(Tracker(opts, fps=30), frames))[0]
        k = np.stack([f.kps for _, f in track])[30:]  # past the filter's start-up
        return np.std(np.diff(k, axis=0))

    raw, smooth = jitter(NO_SMOOTH), jitter(TrackOptions(smooth=1.0))
    stronger = jitter(TrackOptions(smooth=3.0))
    assert raw == pytest.approx(np.sqrt(2), rel=0.1)  # smooth=0 is the raw signal
    assert smooth < 0.3 * raw  # measured 0.18
    assert stronger < 0.8 * smooth  # measured 0.12 of raw


@pytest.mark.parametrize("speed", [0.5, 2.0, 5.0])  # face sizes per second
def test_smoothing_follows_fast_motion(speed):
    rng = np.random.default_rng(0)
    size, fps = 100.0, 30.0
    xs = 200 + speed * size * np.arange(90) / fps
    frames = [
        dets_of([(b, k + rng.normal(0, 1.0, (5, 2)))])
        for b, k in (face_at(x, 300, size) for x in xs)
    ]
    track = by_track(run(Tracker(TrackOptions(smooth=1.0), fps=fps), frames))[0]
    nose_x = np.array([f.kps[2, 0] for _, f in track])
    lag = xs[20:] - nose_x[20:]  # after 2/3 s of motion
    # Measured max 3-5 % of the face size; a plain low-pass at the still-face cutoff
    # (beta = 0) lags 8-80 % here.
    assert np.abs(lag).max() < 0.06 * size


@pytest.mark.parametrize("speed", [5.0, 14.0])  # face sizes per second
def test_a_track_that_starts_in_motion_is_followed_from_its_second_frame(speed):
    """The filter's speed estimate starts at the first step's speed: a face already moving when its
    track starts does not lag its detections over the track's first frames (at rest, the estimate
    needed ~5 frames: 9% of the face size at the second frame at 14 face sizes a second)."""
    from deidcli.faces.track import SMOOTH_BETA, SMOOTH_D_CUTOFF_HZ, SMOOTH_MIN_CUTOFF_HZ, OneEuroFilter

    size, fps = 100.0, 30.0
    xs = 200 + speed * size * np.arange(8) / fps
    f = OneEuroFilter(fps, SMOOTH_MIN_CUTOFF_HZ, SMOOTH_BETA, SMOOTH_D_CUTOFF_HZ)
    lag = np.array([x - f(np.array([x, 300.0]), size)[0] for x in xs])
    assert lag[0] == 0 and np.abs(lag[1:]).max() < 0.03 * size, lag
    still = OneEuroFilter(fps, SMOOTH_MIN_CUTOFF_HZ, SMOOTH_BETA, SMOOTH_D_CUTOFF_HZ)
    out = [still(np.array([200.0, 300.0]), size)[0] for _ in range(5)]
    assert out == [200.0] * 5  # a still face stays put


def test_push_checks_its_input():
    tracker = Tracker(TrackOptions())
    tracker.push(0, Detections.empty())
    with pytest.raises(AssertionError):
        tracker.push(2, Detections.empty())
    with pytest.raises(AssertionError):
        Detections(np.zeros((2, 4)), np.zeros(3), np.zeros((2, 5, 2)))
    with pytest.raises(ValueError):
        Tracker(TrackOptions(max_gap=-1))


def test_box_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0]])


# --------------------------------------------------------------------------------------
# Real footage

needs_shared = pytest.mark.skipif(
    not (MODEL.is_file() and VIDEO.is_file()),
    reason=f"shared data not found at {SHARED} (models/det_scrfd_2.5g_kps.onnx, "
    "videos/ghost_2person.mp4)",
)


@pytest.fixture(scope="module")
def video_frames() -> list[np.ndarray]:
    import av

    frames = []
    with av.open(str(VIDEO)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == N_VIDEO_FRAMES:
                break
    return frames


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(MODEL, det_thresh=0.5, det_size=640)


@pytest.fixture(scope="module")
def video_dets(detector, video_frames) -> list[Detections]:
    return [detector.detect(f) for f in video_frames]


def check_plausible(dets: Detections):
    for box, kps in zip(dets.boxes, dets.kps):
        x0, y0, x1, y1 = box
        assert x1 - x0 > 50 and y1 - y0 > 50
        assert np.all((kps[:, 0] > x0) & (kps[:, 0] < x1) & (kps[:, 1] > y0) & (kps[:, 1] < y1))
        eyes_y, nose_y, mouth_y = kps[:2, 1].mean(), kps[2, 1], kps[3:, 1].mean()
        assert eyes_y < nose_y < mouth_y
        assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]  # left, right in the image


@needs_shared
def test_detector_finds_the_two_faces(detector, video_frames, video_dets):
    assert video_frames[0].shape == (720, 1280, 3)
    for dets in video_dets[::10]:
        assert len(dets) == 2
        assert np.all(dets.scores > 0.7)
        check_plausible(dets)
        centres = (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2
        assert centres.min() < 640 < centres.max()  # one person on each side


@needs_shared
def test_detector_gives_insightface_bgr(detector, video_frames, monkeypatch):
    """The network gets the frame resized to the detector input and in BGR order (InsightFace's
    convention), letterboxed at the top left."""
    import cv2

    seen = []
    real = detector.model.forward

    def spy(img, threshold):
        seen.append(img.copy())
        return real(img, threshold)

    monkeypatch.setattr(detector.model, "forward", spy)
    rgb = video_frames[0]
    detector.detect(rgb)
    w, h = detector.input_size_for(rgb.shape)
    assert seen[0].shape == (h, w, 3) == (384, 640, 3)
    small = cv2.resize(rgb, (640, 360))
    np.testing.assert_array_equal(seen[0][:360], small[:, :, ::-1])
    assert not np.array_equal(seen[0][:360], small) and not seen[0][360:].any()


@needs_shared
def test_detector_input_checks_and_min_face(video_frames):
    image = video_frames[0]
    small = Detector(MODEL, min_face=150)
    dets = small.detect(image)
    # The faces' shorter sides are about 106 and 183 px.
    assert len(dets) == 1 and small.n_small == 1
    assert np.min(dets.boxes[0, 2:] - dets.boxes[0, :2]) >= 150
    with pytest.raises(AssertionError):
        small.detect(image.astype(np.float32))
    with pytest.raises(AssertionError):
        small.detect(image[:, :, 0])


@needs_shared
def test_detector_loading_prints_nothing(capsys):
    buf = io.StringIO()
    with redirect_stdout(buf):
        Detector(MODEL).detect(np.zeros((64, 96, 3), np.uint8))
    assert buf.getvalue() == "" and capsys.readouterr().out == ""


@needs_shared
@pytest.mark.skipif(not MODEL_500M.is_file(), reason=f"{MODEL_500M} not found")
def test_fixed_size_model_uses_its_own_size(video_frames, caplog):
    with caplog.at_level(logging.WARNING, logger="deidcli.faces"):
        det = Detector(MODEL_500M, det_size=320)
    assert det.input_size == (640, 640)
    assert "fixed 640x640" in caplog.text
    dets = det.detect(video_frames[0])
    assert len(dets) == 2
    check_plausible(dets)


@needs_shared
@pytest.mark.skipif(not MODEL_500M.is_file(), reason=f"{MODEL_500M} not found")
def test_fixed_size_model_looks_near_faces_too(video_frames):
    """The looks that cut a frame into squares (near looks between searches, the look around
    generated faces, the zoomed second look) run a fixed 640x640 model too, the squares put into
    its input at their own scale, and find the faces the frame's search finds. They raised on any
    other size, and `deid anonymize --detector det_scrfd_500m_kps_640.onnx` failed on every file."""
    det = Detector(MODEL_500M, det_thresh=0.3)
    img = video_frames[0]
    full = det.detect(img)
    assert len(full) == 2
    for near in (det.detect_near(img, full.boxes), det.look_around(img, full.boxes)):
        assert (box_iou(full.boxes, near.boxes).max(1) > 0.8).all()
    assert min(det.zoom_score(img, b) for b in full.boxes) > 0.5


@needs_shared
@pytest.mark.parametrize("clip,factor", [("lp_d13.mp4", 2.0), ("lp_d13.mp4", 3.0), ("ghost_obama_short.mp4", 3.0)])
def test_a_face_too_large_for_the_search_is_found_by_the_coarse_look(clip, factor):
    """A talking head scaled up into a large frame (a 1440x2560 or 2160x3840 phone selfie, a 4K
    talking head): the search, at half the frame's size, sees the face at 450-780 px and scores it
    under the start threshold or not at all; the coarse look finds it, whole, at 0.5 or more. A
    1280x720 frame gets no coarse look."""
    import cv2

    from deidcli.faces.detect import COARSE_OVER

    det = Detector(MODEL, det_thresh=0.2, det_size=0)  # auto, as deid anonymize searches
    img = cv2.resize(decode_rgb(SHARED / "videos" / clip, 1)[0], None, fx=factor, fy=factor,
                     interpolation=cv2.INTER_CUBIC)
    searched, _ = det._detect(img, det.input_size_for(img.shape))
    assert not (searched[:, 4] >= COARSE_OVER).any()  # the premise: the search alone misses it
    dets = det.detect(img)
    assert len(dets) and dets.scores[0] >= 0.5
    assert dets.boxes[0, 3] - dets.boxes[0, 1] > 0.35 * img.shape[0]  # the whole face
    check_plausible(dets.select(dets.scores >= 0.5))
    assert det.coarse_size((720, 1280, 3)) is None


def test_detector_missing_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Detector(tmp_path / "nope.onnx")
    with pytest.raises(ValueError):
        Detector(MODEL if MODEL.is_file() else Path(__file__), det_size=100)  # det_size: checked before reading


@needs_shared
def test_tracker_on_video_gives_two_long_tracks(video_dets):
    tracker = Tracker(TrackOptions(), fps=30000 / 1001)
    tracks = by_track(run(tracker, video_dets))
    assert sorted(tracks) == [0, 1]
    for track in tracks.values():
        assert len(track) == N_VIDEO_FRAMES
        xs = [(f.box[0] + f.box[2]) / 2 for _, f in track]
        assert max(xs) < 640 or min(xs) > 640, "a track jumped between the two people"


@needs_shared
def test_tracker_fills_real_misses_close_to_the_detector(video_dets):
    # Drop the right-hand face on frames 20-24 (as if missed): it is filled in, and the
    # filled boxes land on the faces the detector had actually found.
    dropped = list(video_dets)
    for i in range(20, 25):
        d = video_dets[i]
        dropped[i] = d.select((d.boxes[:, 0] + d.boxes[:, 2]) / 2 < 640)
    tracker = Tracker(TrackOptions(max_gap=8), fps=30000 / 1001)
    tracks = by_track(run(tracker, dropped))
    assert sorted(tracks) == [0, 1] and tracker.n_interpolated == 5
    right = next(t for t in tracks.values() if t[0][1].box[0] > 640)
    for i, f in right:
        assert f.interpolated == (20 <= i < 25)
        if f.interpolated:
            truth = video_dets[i].boxes[video_dets[i].boxes[:, 0] > 640]
            assert box_iou(f.box, truth)[0, 0] > 0.8
    # With a max_gap shorter than the miss, the face is not filled and the track splits.
    tracker = Tracker(replace(TrackOptions(), max_gap=4), fps=30000 / 1001)
    tracks = by_track(run(tracker, dropped))
    assert tracker.n_tracks == 3 and tracker.n_interpolated == 0


def test_weak_detections_continue_tracks_but_never_start_them():
    """Hysteresis: a face whose score sags below det_thresh for longer than max_gap stays one
    covered track; a weak detection away from any track is not output."""
    opts = TrackOptions(smooth=0.0, max_gap=4)
    frames = []
    for i in range(30):
        a = face_at(100 + 3 * i, 100)
        score_a = 0.9 if i < 5 or i >= 20 else 0.35  # 15 weak frames, > max_gap
        faces, scores = [a], [score_a]
        if i == 10:  # a lone weak blip elsewhere
            faces.append(face_at(500, 400))
            scores.append(0.35)
        frames.append(dets_of(faces, np.array(scores)))
    t = Tracker(opts, start_thresh=0.5)
    tracks = by_track(run(t, frames))
    assert list(tracks) == [0] and len(tracks[0]) == 30
    assert t.n_weak_kept == 15 and t.n_weak_dropped == 1
    # without hysteresis (weak detections filtered out before tracking) the face splits/exposes
    t2 = Tracker(opts, start_thresh=0.5)
    strong = [d.select(d.scores >= 0.5) for d in frames]
    assert sum(len(f) for _, f in run(t2, strong)) < 30


def test_new_track_reaches_back_over_weak_detections_first_frame_included():
    """A face that fades in (scores below det_thresh for its first 12 frames, frame 0 included)
    is covered from frame 0 once a detection reaches det_thresh; a weak face that never does is
    never output; beyond reach_back the oldest weak frames are let go (the buffer stays bounded)."""
    def fade(n_weak, n=30, blip=False):
        frames = []
        for i in range(n):
            faces, scores = [face_at(100 + 2 * i, 100)], [0.35 if i < n_weak else 0.9]
            if blip:  # a weak thing that never reaches det_thresh, all along
                faces.append(face_at(500, 400))
                scores.append(0.33)
            frames.append(dets_of(faces, np.array(scores)))
        return frames

    opts = TrackOptions(smooth=0.0, max_gap=4, reach_back=20)
    t = Tracker(opts, start_thresh=0.5)
    tracks = by_track(run(t, fade(12, blip=True)))
    assert list(tracks) == [0] and [i for i, _ in tracks[0]] == list(range(30))
    assert not any(f.interpolated for _, f in tracks[0])
    assert t.n_reached_back == 12 and t.n_weak_kept == 12 and t.n_weak_dropped == 30  # the blip
    a = tracks[0][0][1]
    assert np.allclose(a.box, face_at(100, 100)[0])  # frame 0 at the weak detection's own box
    # weak for longer than reach_back: only the last reach_back weak frames are covered
    t = Tracker(opts, start_thresh=0.5)
    tracks = by_track(run(t, fade(26, n=40)))
    assert [i for i, _ in tracks[0]] == list(range(26 - 20, 40))
    assert t.n_reached_back == 20 and t.n_weak_dropped == 6
    # reach_back 0: the old behaviour (a track starts at its first strong detection)
    t = Tracker(TrackOptions(smooth=0.0, max_gap=4, reach_back=0), start_thresh=0.5)
    tracks = by_track(run(t, fade(12)))
    assert [i for i, _ in tracks[0]] == list(range(12, 30))


def test_a_face_the_look_back_saw_at_the_start_threshold_starts_a_track():
    """--search-every: a face that pops in between two searches is looked for backwards from the
    search that finds it (faces/looks.py, Tracker.push's ``history``). Where that look saw it at
    the start threshold, it is a track from there, even if the search itself scored it under
    WEAK_MIN (stress set crowd_4k, frame 15: seen back at 0.50 and 0.43, searched at 0.28 in frame
    17, dropped with its history, and the frame went out as it was); where the look saw it at
    WEAK_MIN or more, it is a tentative track that a later detection at the threshold confirms
    from that frame on."""
    from deidcli.faces.detect import WEAK_MIN

    def feed(back_scores, search_score, later_score):
        """The face appears at frame 2; frames 0, 4 and 8 are searched; 4 looks back over 3 and 2."""
        t = Tracker(TrackOptions(smooth=0.0), start_thresh=0.5)
        out = []
        for i in range(12):
            box, kps = face_at(300 + 4 * i, 300)
            if i in (0, 4, 8) or i == 11:
                d = dets_of([(box, kps)], np.array([search_score if i == 4 else later_score])) if i >= 2 else dets_of([])
                hist = {0: [(f, *face_at(300 + 4 * f, 300), sc) for f, sc in zip((2, 3), back_scores)]} if i == 4 else None
                out += t.push(i, d, searched=True, history=hist)
            else:  # near looks: no followed face around, nothing found
                out += t.push(i, dets_of([]), searched=False)
        out += t.flush()
        return sorted(i for i, faces in out if any(not f.held for f in faces))

    low = WEAK_MIN - 0.05
    assert feed((0.55, 0.45), low, 0.9) == list(range(2, 12))  # a track from frame 2
    assert feed((0.35, 0.32), low, 0.9) == list(range(2, 12))  # tentative, confirmed at 8
    assert feed((0.35, 0.32), low, 0.4) == []  # never at the threshold: nothing
    assert feed((0.2, 0.2), low, 0.9)[0] == 8  # nothing seen back: from the search at 8


# --------------------------------------------------------------------------------------
# --detect-every: frames the detector does not look at (None) are covered by the tracks


def every(frames: list, n: int) -> list:
    return [d if i % n == 0 else None for i, d in enumerate(frames)]


def test_undetected_frames_are_interpolated_between_detections():
    frames, truth_a = two_faces(n=19)
    t = Tracker(NO_SMOOTH)
    tracks = by_track(run(t, every(frames, 3)))
    assert sorted(tracks) == [0, 1]
    for track in tracks.values():
        assert [i for i, _ in track] == list(range(19))  # every frame covered
        assert all(f.interpolated == (i % 3 != 0) for i, f in track)
    a = next(tr for tr in tracks.values() if tr[0][1].box[1] < 200)
    for i, f in a:  # linear motion: interpolation is exact
        np.testing.assert_allclose(f.box, truth_a[i][0], atol=1e-3)
    assert t.n_predicted == 0


def test_undetected_frames_at_a_track_start_and_end_are_held():
    # The face is present on frames 4..10; the detector looks at 0, 3, 6, 9, 12, 15.
    # It first sees the face at 6 and last at 9: the track covers 4..5 (held back from 6),
    # 7..8 (interpolated) and 10..11 (held forward from 9, up to the next detected frame).
    # Frames 3 and 12 were looked at and had no face: not covered.
    frames = [dets_of([face_at(200 + 2 * i, 200)]) if 4 <= i <= 10 else dets_of([]) for i in range(16)]
    t = Tracker(NO_SMOOTH)
    out = run(t, every(frames, 3))
    covered = [i for i, faces in out if faces]
    assert covered == [4, 5, 6, 7, 8, 9, 10, 11]
    assert t.n_predicted == 4 and t.n_interpolated == 2
    held = dict((i, f) for i, faces in out for f in faces)
    np.testing.assert_allclose(held[4].box, face_at(212, 200)[0])  # the box first detected (frame 6)
    np.testing.assert_allclose(held[11].box, face_at(218, 200)[0])  # the box last detected (frame 9)
    assert all(held[i].interpolated for i in (4, 5, 7, 8, 10, 11))


def test_undetected_tail_is_covered_at_flush():
    frames = [dets_of([face_at(300, 300)]) for _ in range(11)]
    t = Tracker(NO_SMOOTH)
    out = run(t, every(frames, 4))  # detected at 0, 4, 8; frames 9, 10 only by holding
    assert all(len(faces) == 1 for _, faces in out)
    assert t.n_predicted == 2


@needs_shared
def test_detect_every_on_real_detections_stays_on_the_faces(video_dets):
    """Every 3rd frame detected: both faces covered on all 60 frames, and the boxes on the
    frames the detector skipped land on the faces it finds when it does look."""
    t = Tracker(TrackOptions(), fps=30000 / 1001)
    tracks = by_track(run(t, every(video_dets, 3)))
    assert sorted(tracks) == [0, 1]
    for track in tracks.values():
        assert len(track) == N_VIDEO_FRAMES
        for i, f in track:
            truth = video_dets[i].boxes
            assert box_iou(f.box, truth).max() > 0.8, i


def test_detect_every_is_bounded_by_max_gap():
    from deidcli.options import AnonymizeOptions, DetectOptions

    AnonymizeOptions(detect=DetectOptions(detect_every=9))  # max_gap 8 -> at most 9
    with pytest.raises(ValueError, match="detect_every"):
        AnonymizeOptions(detect=DetectOptions(detect_every=10))


@needs_shared
def test_detect_every_end_to_end(clips, tmp_path):
    """The pipeline with --detect-every 2 on a real 2-person clip: every frame still has both
    faces anonymized, and the report says how many frames were not looked at."""
    import math
    import subprocess
    import sys

    from deidcli.pipeline.anonymize import anonymize
    from deidcli.options import AnonymizeOptions, DetectOptions

    rep = anonymize(clips["two_person"], tmp_path / "o.mp4",
                    AnonymizeOptions(method="blur", detect=DetectOptions(detect_every=2)))
    f = rep["files"][0]
    assert f["status"] == "ok", f
    assert f["frames_not_detected"] == f["frames"] - math.ceil(f["frames"] / 2) > 0
    assert f["faces_anonymized"] == 2 * f["frames"]
    assert f["tracks"] == 2
    p = subprocess.run([sys.executable, "-m", "deidcli.cli", "anonymize", str(clips["two_person"]),
                        str(tmp_path / "p.mp4"), "--detect-every", "20"], capture_output=True, text=True)
    assert p.returncode == 2 and "detect_every" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------------------
# Detector precision: the int8 model built at load (deidcli/quantize.py) against fp32

PORTRAIT = SHARED / "videos" / "lp_d13.mp4"  # 720x1280: another detector input shape (384x640)


@pytest.fixture(scope="module")
def fp32_detector() -> Detector:
    return Detector(MODEL, det_thresh=0.3, precision="fp32")


@pytest.fixture(scope="module")
def int8_detector() -> Detector:
    return Detector(MODEL, det_thresh=0.3, precision="auto")  # auto: int8 with the CPU provider alone


@needs_shared
def test_auto_precision_is_int8_on_the_cpu(detector, fp32_detector, int8_detector):
    assert int8_detector.precision == "int8"
    assert fp32_detector.precision == detector.precision == "fp32"  # the library default: the reference
    assert 0 < int8_detector.build_seconds < 30 and fp32_detector.build_seconds is None
    # the sessions: the model file as it is, and the quantized graph made in memory
    assert fp32_detector.model.session.get_modelmeta().producer_name == "pytorch"
    assert int8_detector.model.session.get_modelmeta().producer_name == "onnx.quantize"
    assert int8_detector.providers == fp32_detector.providers == ["CPUExecutionProvider"]


@needs_shared
def test_int8_loading_prints_nothing(capsys):
    buf = io.StringIO()
    with redirect_stdout(buf):
        det = Detector(MODEL, precision="int8")
        det.detect(np.zeros((64, 96, 3), np.uint8))
    assert det.precision == "int8"
    assert buf.getvalue() == "" and capsys.readouterr().out == ""


@needs_shared
def test_int8_detections_agree_with_fp32(fp32_detector, int8_detector, video_frames):
    """Every fp32 face scored >= 0.5 is found by int8 (IoU >= 0.9) with landmarks within 5% of
    the inter-ocular distance and a score within 0.05, on 720p and portrait frames."""
    import av

    frames = video_frames[::6]
    with av.open(str(PORTRAIT)) as c:
        frames += [f.to_ndarray(format="rgb24") for i, f in zip(range(40), c.decode(video=0)) if i % 8 == 0]
    n = 0
    for rgb in frames:
        a, b = fp32_detector.detect(rgb), int8_detector.detect(rgb)
        a = a.select(a.scores >= 0.5)
        for box, kps, score in zip(a.boxes, a.kps, a.scores):
            iou = box_iou(box, b.boxes)[0]
            assert iou.size and iou.max() >= 0.9, (box, b.boxes)
            j = int(iou.argmax())
            iod = np.linalg.norm(kps[1] - kps[0])
            assert np.linalg.norm(b.kps[j] - kps, axis=1).max() < 0.05 * iod
            assert abs(float(b.scores[j]) - float(score)) < 0.05
            n += 1
        assert len(b.select(b.scores >= 0.6)) == len(a.select(a.scores >= 0.6))
    assert n >= 2 * 10 + 5  # two faces per 720p frame, one per portrait frame


@needs_shared
def test_int8_build_writes_nothing_outside_a_temporary_folder(tmp_path, monkeypatch):
    from deidcli import quantize

    monkeypatch.chdir(tmp_path)  # onnxruntime's quantization tools like to write into the cwd
    model = tmp_path / "models" / MODEL.name
    model.parent.mkdir()
    model.write_bytes(MODEL.read_bytes())
    data, info = quantize.build_int8(model)
    assert data[:2] and info["recipe"]["quant_format"] == "QDQ"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["models", f"models/{MODEL.name}"]


@needs_shared
def test_other_detector_file_falls_back_to_fp32_with_one_warning(tmp_path, caplog):
    """Same name, different bytes: the shipped calibration is not for it."""
    import onnx

    m = onnx.load(str(MODEL))
    m.doc_string = "not the file the calibration was made for"
    other = tmp_path / MODEL.name
    onnx.save(m, str(other))
    for precision in ("auto", "int8"):  # a file that is not the calibrated one: a warning either way
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="deidcli.faces"):
            det = Detector(other, precision=precision)
        assert det.precision == "fp32"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "another detector file" in warnings[0].getMessage()
        assert "\n" not in warnings[0].getMessage()
    assert len(det.detect(np.zeros((64, 96, 3), np.uint8))) == 0  # and it runs


@needs_shared
@pytest.mark.skipif(not MODEL_500M.is_file(), reason=f"{MODEL_500M} not found")
def test_detector_without_calibration_runs_fp32(caplog):
    with caplog.at_level(logging.INFO, logger="deidcli.faces"):
        auto = Detector(MODEL_500M, precision="auto")  # auto: said at INFO only
    assert auto.precision == "fp32"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "no int8 calibration" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deidcli.faces"):
        asked = Detector(MODEL_500M, precision="int8")  # asked for: a warning
    assert asked.precision == "fp32" and "no int8 calibration" in caplog.text


@needs_shared
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available:UserWarning")
def test_int8_is_for_the_cpu_provider_only(caplog):
    """Any other provider list keeps fp32 (CUDA in CI boxes without onnxruntime-gpu falls back to
    the CPU inside onnxruntime; the precision is decided on the providers asked for)."""
    with caplog.at_level(logging.WARNING, logger="deidcli.faces"):
        det = Detector(MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], precision="int8")
    assert det.precision == "fp32" and "CPU execution provider only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deidcli.faces"):
        assert Detector(MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                        precision="auto").precision == "fp32"
    assert caplog.text == ""  # auto on CUDA: fp32, nothing to say
    with pytest.raises(ValueError, match="precision"):
        Detector(MODEL, precision="int4")


@needs_shared
def test_detect_equals_insightface_on_the_bgr_frame(fp32_detector, int8_detector, video_frames):
    """Detector.detect resizes the RGB frame before putting it in BGR order (not the whole frame):
    boxes, scores and landmarks are InsightFace's own SCRFD.detect on the BGR frame, to the bit,
    for landscape, portrait, odd sizes (letterbox rounding) and the fixed-size 640x640 model."""
    import av
    import cv2

    with av.open(str(PORTRAIT)) as c:
        portrait = next(c.decode(video=0)).to_ndarray(format="rgb24")
    images = [video_frames[0], video_frames[30], portrait,
              cv2.resize(video_frames[45], (853, 479)), cv2.resize(portrait, (301, 533)),
              np.zeros((64, 96, 3), np.uint8)]
    fixed = Detector(MODEL_500M, det_thresh=0.3)
    n = 0
    for det in (fp32_detector, int8_detector, fixed):
        for img in images:
            size = det.input_size_for(img.shape)
            got = det._detect(img, size)
            want = det.model.detect(np.ascontiguousarray(img[:, :, ::-1]), input_size=size, max_num=0)
            assert got[0].dtype == want[0].dtype == np.float32
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (det.precision, img.shape)
            n += len(got[0])
    assert n > 20  # faces were found: the comparison is not between empty results


def test_a_weak_face_confirmed_while_an_earlier_one_waits_starts_its_track():
    """Two faces seen below the start threshold wait as tentative tracks; the second reaches the
    threshold first. Taking it out of the waiting list compared it with the first by value, arrays
    and all, and raised (``deid live`` on a 1920x1080 clip, 2026-12-07): tentatives are compared
    by identity."""
    def dets(scores):
        boxes = np.array([[100, 100, 200, 220], [600, 100, 700, 220]], np.float32)[: len(scores)]
        kps = np.stack([np.array([[130, 150], [170, 150], [150, 175], [135, 195], [165, 195]], np.float32)
                        + [b[0] - 100, 0] for b in boxes])
        return Detections(boxes, np.array(scores, np.float32), kps)

    tracker = Tracker(TrackOptions(), fps=30, start_thresh=0.5)
    out = []
    for i, scores in enumerate([(0.4, 0.4), (0.4, 0.6), (0.6, 0.6), (0.6, 0.6)]):
        out += tracker.push(i, dets(scores))
    out += tracker.flush()
    tracks = by_track(out)
    assert len(tracks) == 2 and all(len(v) == 4 for v in tracks.values())  # each from its first frame


def test_a_face_held_past_a_box_that_grows_or_shrinks_keeps_a_face_sized_box():
    """A held face's box moves with its track but never shrinks below the box it is held from: a
    face coming in through the left border, whose detected box grows as more of it shows (stress
    set crowd_1080: 46 -> 73 px in a frame), was held the frames before its first detection at 18
    px and then at a box turned inside out; one going out through the right border, its box
    shrinking, was held past its last at the same kind of box."""
    def face_box(x0, x1, y0, y1):
        return Detections(np.array([[x0, y0, x1, y1]], np.float32), np.array([0.9], np.float32),
                          np.tile(np.array([[(x0 + x1) / 2, (y0 + y1) / 2]], np.float32), (5, 1))[None])

    # coming in through the left border: the box grows by 27 px a frame (crowd_1080, frames 73-76)
    coming = [Detections.empty()] * 4 + [face_box(-10, 14, 485, 531), face_box(-19, 27, 470, 543),
                                         face_box(-23, 39, 469, 552), face_box(-24, 44, 484, 576)]
    coming += [Detections.empty()] * 6
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1920, 1080)
    out = run(tracker, coming)
    held = [(i, f.box) for i, faces in out for f in faces if f.held and i < 4]
    assert held  # the frames before its first detection are held ...
    for _, box in held:  # ... at a box at least the first one's size
        assert box[2] - box[0] >= 24 - 1e-6 and box[3] - box[1] >= 46 - 1e-6, box
    # going out through the right border: the box shrinks by 30 px a frame
    going = [Detections.empty()] * 2 + [face_box(1860 + 10 * i, 1920 + 30 - 30 * i + 10 * i, 400, 480 - 20 * i)
                                        for i in range(3)] + [Detections.empty()] * 6
    tracker = Tracker(TrackOptions(max_gap=2, pad=2, smooth=0.0))
    tracker.frame_size = (1920, 1080)
    out = run(tracker, going)
    last = going[4].boxes[0]
    after = [f.box for i, faces in out for f in faces if f.held and i > 4]
    assert after
    for box in after:
        assert box[2] - box[0] >= last[2] - last[0] - 1e-6 and box[3] - box[1] >= last[3] - last[1] - 1e-6, box
