"""Frame sampling on generated H.264 clips: the seeking decoder returns exactly the frames a full
decode picks, the fps and scene modes, the OpenCV fallback, resizing, and corrupt files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmreason.config import ConfigError
from mmreason.data.video import (
    CorruptVideoError,
    FrameSampling,
    by_full_decode,
    fps_times,
    sample_frames,
    scene_times,
    uniform_times,
    write_synthetic_clip,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """12 s, 24 fps, 320x180, 4 scenes of 3 s, a keyframe every second."""
    return write_synthetic_clip(tmp_path_factory.mktemp("video") / "clip.mp4", 12, fps=24, size=(320, 180),
                                scenes=4, gop_s=1.0)


def test_uniform_times_are_slice_centres_and_scene_times_cover_every_scene():
    assert uniform_times(10, 4) == [1.25, 3.75, 6.25, 8.75]
    assert fps_times(10, 1.0, 64) == [k + 0.5 for k in range(10)]
    assert fps_times(100, 1.0, 8) == uniform_times(100, 8)  # capped: spread, not truncated
    times = scene_times(12.0, [3.0, 6.0, 9.0], 6)
    assert len(times) == 6 and times == sorted(times)
    assert all(any(a <= t < b for t in times) for a, b in [(0, 3), (3, 6), (6, 9), (9, 12)])
    # one short scene still gets a frame; the long one gets the rest
    times = scene_times(10.0, [0.5], 4)
    assert sum(t < 0.5 for t in times) == 1 and len(times) == 4
    # more scenes than frames: the longest scenes, one frame each
    assert scene_times(10.0, [1.0, 5.0, 5.5], 2) == [3.0, 7.75]


@pytest.mark.parametrize("num_frames", [1, 5, 16, 30])
def test_seeking_returns_exactly_the_frames_of_a_full_decode(clip, num_frames):
    cfg = FrameSampling(num_frames=num_frames, max_side=0)
    fast = sample_frames(clip, cfg)
    slow = sample_frames(clip, cfg, pick=by_full_decode)
    assert fast.decoder == "pyav" and len(fast.frames) == num_frames
    assert fast.times == slow.times
    assert fast.frames == slow.frames
    want = uniform_times(12.0, num_frames)
    assert all(w - 1 / 48 <= t < w + 1 / 24 + 1e-6 for w, t in zip(want, fast.times))


def test_fps_mode_and_resize(clip):
    out = sample_frames(clip, FrameSampling(mode="fps", fps=2.0, max_side=160))
    assert len(out.frames) == 24
    assert out.times == sorted(out.times) and out.times[0] == pytest.approx(0.25, abs=1 / 24)
    img = Image.open(io.BytesIO(out.frames[3]))
    assert img.format == "JPEG" and img.size == (160, 90) and (out.width, out.height) == (160, 90)
    assert sample_frames(clip, FrameSampling(num_frames=2, max_side=1000)).width == 320  # never upscaled


def test_scene_mode_finds_the_cuts_and_samples_every_scene(clip):
    out = sample_frames(clip, FrameSampling(mode="scene", num_frames=8, max_side=0))
    assert out.scene_cuts == pytest.approx([3.0, 6.0, 9.0], abs=0.3)
    assert [sum(a <= t < a + 3 for t in out.times) for a in (0, 3, 6, 9)] == [2, 2, 2, 2]
    # the frames really come from four different scenes (their brightness alternates)
    means = [np.asarray(Image.open(io.BytesIO(f)).convert("L")).mean() for f in out.frames]
    assert abs(means[0] - means[2]) > 60 and abs(means[2] - means[4]) > 60


def test_opencv_decoder_agrees_with_pyav(clip):
    cfg = FrameSampling(num_frames=6, max_side=0)
    av_out = sample_frames(clip, cfg)
    cv_out = sample_frames(clip, FrameSampling(num_frames=6, max_side=0, decoder="opencv"))
    assert cv_out.decoder == "opencv" and cv_out.duration == pytest.approx(12.0, abs=0.05)
    assert cv_out.times == pytest.approx(av_out.times, abs=1 / 24 + 1e-6)
    a, b = (Image.open(io.BytesIO(x.frames[2])).convert("L") for x in (av_out, cv_out))
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()
    assert diff < 8  # the same picture, up to JPEG and colour conversion


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_raise_naming_the_file(clip, tmp_path, damage):
    data = clip.read_bytes()
    bad = tmp_path / f"{damage}.mp4"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 999, "empty": b""}[damage])
    with pytest.raises(CorruptVideoError, match=str(bad)):
        sample_frames(bad, FrameSampling(num_frames=4))


def test_bad_sampling_settings_are_config_errors():
    with pytest.raises(ConfigError, match="num_frames"):
        FrameSampling(num_frames=0)
    with pytest.raises(ConfigError, match="scene_threshold"):
        FrameSampling(scene_threshold=2)
