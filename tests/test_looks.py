"""--search-every (faces/looks.py): the whole frame searched every Nth frame, the followed faces
looked at near their predicted boxes between, on real clips from ../shared/videos."""

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, decode_rgb


@pytest.fixture(scope="module")
def pipelines(shared):
    from deidcli.options import AnonymizeOptions, DetectOptions
    from deidcli.pipeline.pipeline import Pipeline

    return {n: Pipeline(AnonymizeOptions(method="blur", models_dir=MODELS, detect=DetectOptions(search_every=n)),
                        render=False) for n in (1, 4)}


def _track(pipeline, frames):
    """[(index, faces)] and the FileResult of detecting and tracking ``frames`` (RGB arrays)."""
    from types import SimpleNamespace

    from deidcli.pipeline.report import FileResult

    res = FileResult(input="", output="")
    out = [(vf.index, faces) for vf, faces in pipeline.detect_and_track(
        iter([SimpleNamespace(index=i, image=im) for i, im in enumerate(frames)]), res, 30.0)]
    assert [i for i, _ in out] == list(range(len(frames)))
    return out, res


def _covered(face, faces, iou=0.5) -> bool:
    from deidcli.faces.detect import box_iou

    boxes = np.array([f.box for f in faces], np.float32).reshape(-1, 4)
    return bool(len(boxes)) and box_iou(face.box[None], boxes).max() >= iou


def test_near_looks_follow_the_faces_a_search_of_every_frame_finds(pipelines):
    frames = decode_rgb(VIDEOS / "ghost_2person.mp4", 40)
    every, r1 = _track(pipelines[1], frames)
    sparse, r4 = _track(pipelines[4], frames)
    # searched: 0, 4, ..., 36 and the last frame, 39
    assert (r1.frames_searched, r4.frames_searched, r4.frames_near) == (40, 11, 29)
    assert r4.faces_near == 58 and r4.searches_lost == 0
    for (i, a), (_, b) in zip(every, sparse):
        assert len(a) == len(b) == 2, i
        assert all(_covered(f, b) for f in a) and all(_covered(f, a) for f in b), i


def test_a_face_that_appears_between_searches_is_covered_from_its_first_frame(pipelines):
    """The face is hidden (its region filled flat) in frames 0-5 and visible from frame 6; the
    searches are at frames 0, 4 and 8. The search at 8 finds it and the look back finds it in 7 and
    6, where it is covered at its own box, not at frame 8's; frame 5 (not searched, no face) is held
    at its first box."""
    frames = decode_rgb(VIDEOS / "ghost_obama_short.mp4", 16)
    full, _ = _track(pipelines[1], frames)
    _hide_face(frames, full[0][1][0].box, 6)
    every, _ = _track(pipelines[1], frames)
    assert [len(f) for _, f in every[:8]] == [0, 0, 0, 0, 0, 0, 1, 1]  # the face is seen from frame 6
    sparse, res = _track(pipelines[4], frames)
    assert res.searches_cut == 0 and res.faces_found_back == 2
    for i in (6, 7):
        face, = sparse[i][1]
        assert not face.held and _covered(face, every[i][1], 0.6), i
    held, = sparse[5][1]
    assert held.held
    assert all(not f for _, f in sparse[:5])
    # frame 8's box is not where the face was in frame 6 (it moves): the look back is what covers it
    assert all(_covered(f, every[i][1]) for i in range(6, 16) for f in sparse[i][1])


def _hide_face(frames, box, upto):
    """Fill the region around ``box`` (grown by 0.3 of its size) flat in frames[:upto]."""
    w, h = box[2] - box[0], box[3] - box[1]
    x0, y0 = int(max(box[0] - 0.3 * w, 0)), int(max(box[1] - 0.3 * h, 0))
    x1, y1 = int(box[2] + 0.3 * w), int(box[3] + 0.3 * h)
    for im in frames[:upto]:
        im[y0:y1, x0:x1] = im[y0:y1, x0:x1].reshape(-1, 3).mean(0).astype(np.uint8)


def test_a_face_that_appears_after_the_last_search_is_found_at_the_last_frame(pipelines):
    """16 frames, the face hidden in frames 0-12: the searches in the cycle are at 0, 4, 8 and 12,
    none of which sees it. The last frame (15) is searched anyway, and the look back covers 14 and 13
    at the face's own boxes; without that the face would go untracked to the end of the file."""
    frames = decode_rgb(VIDEOS / "ghost_obama_short.mp4", 16)
    full, _ = _track(pipelines[1], frames)
    _hide_face(frames, full[0][1][0].box, 13)
    every, _ = _track(pipelines[1], frames)
    assert [len(f) for _, f in every[11:]] == [0, 0, 1, 1, 1]
    sparse, res = _track(pipelines[4], frames)
    assert res.frames_searched == 5 and res.faces_found_back == 2
    for i in (13, 14, 15):
        face, = sparse[i][1]
        assert not face.held and _covered(face, every[i][1], 0.6), i
    assert all(not f for _, f in sparse[:12])


def test_a_cut_is_searched_at_once_and_ends_every_track(pipelines):
    """ghost_2person cut to ghost_obama_short at frame 10 (not a search frame): the cut frame is
    searched, the new face is covered from it on at its own box, in a track of its own."""
    frames = decode_rgb(VIDEOS / "ghost_2person.mp4", 10) + decode_rgb(VIDEOS / "ghost_obama_short.mp4", 10)
    every, _ = _track(pipelines[1], frames)
    sparse, res = _track(pipelines[4], frames)
    assert res.searches_cut == 1
    for i in range(10, 20):
        assert every[i][1] and all(_covered(f, sparse[i][1]) for f in every[i][1]), i
    assert res.faces_found_back == 0
    # every track ends at the cut, and none is held or padded over it either way
    before = {f.track_id for _, faces in sparse[:10] for f in faces}
    after = {f.track_id for _, faces in sparse[10:] for f in faces}
    assert before and after and not before & after
    assert res.cuts == 1


def test_a_small_face_is_looked_at_as_the_search_sees_it(shared, tmp_path):
    """45-80 px faces of the stress set's 3x3 mosaic (under 51 px at the search's scale): the near
    look, a 256 px square of the search's own input on the network's grid, finds the landmarks the
    search finds, within about 1% of the inter-ocular distance (median; a 128 px square of the face's
    own at the search's scale, as before: 3.2% on these frames)."""
    from deidcli.faces.detect import NEAR_RATIO, NEAR_SIDE, Detector, box_iou
    from deidcli.research import stress

    clip = tmp_path / "mosaic3.mp4"
    stress.make_clip("mosaic3", clip, seed=0, seconds=0.2)
    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx", det_thresh=0.5, precision="int8")
    errs = []
    for img in decode_rgb(clip):
        s = det.detect(img)
        small = (s.boxes[:, 3] - s.boxes[:, 1]) * det.search_scale(img.shape) < NEAR_SIDE / NEAR_RATIO
        assert small.sum() >= 5  # the premise
        near = det.detect_near(img, s.boxes[small])
        for box, kps in zip(s.boxes[small], s.kps[small]):
            iou = box_iou(box[None], near.boxes)[0]
            assert iou.max() > 0.8
            k = near.kps[int(iou.argmax())]
            errs.append(np.linalg.norm(k - kps, axis=1).mean() / np.linalg.norm(kps[1] - kps[0]) * 100)
    assert np.median(errs) < 2.0, np.round(errs, 1)
