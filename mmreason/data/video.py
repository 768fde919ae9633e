"""Frame sampling from video files: which times to take, and decoding just those frames.

    from mmreason.data.video import FrameSampling, sample_frames
    clip = sample_frames("clip.mp4", FrameSampling(mode="uniform", num_frames=16))
    clip.frames, clip.times          # JPEG bytes, seconds from the start of the clip

Three ways to pick times: `uniform` (`num_frames` at the centres of equal slices of the clip),
`fps` (a fixed rate, capped at `max_frames`) and `scene` (content-adaptive: a cheap pass compares
small grey thumbnails to find cuts, then every scene gets frames in proportion to its length, at
least one each). Decoding goes through PyAV and seeks to the keyframe before each wanted time, so
only the frames between that keyframe and the target are decoded (`benchmarks/frames.py` measures
it against decoding every frame); OpenCV is the fallback when PyAV cannot read a file. Frames are
resized so the longer side is at most `max_side` and stored as JPEG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
from PIL import Image

from mmreason import storage
from mmreason.config import ConfigError

SEEK_GAP_S = 1.0  # decode forward instead of seeking when the next target is this close
THUMB_SIZE = (64, 36)  # the scene pass compares grey thumbnails of this size


class CorruptVideoError(ValueError):
    """A video file cannot be decoded (truncated, not a video, no video stream); names the file."""


@dataclass
class FrameSampling:
    """Which frames to take from a clip and how to store them."""

    mode: Literal["uniform", "fps", "scene"] = "uniform"
    """uniform: `num_frames` evenly spread; fps: `fps` frames a second; scene: spread over scene cuts."""
    num_frames: int = 16
    """Frames per clip in the uniform and scene modes."""
    fps: float = 1.0
    """Frames per second in the fps mode."""
    max_frames: int = 64
    """Cap for the fps mode (a longer clip gets `max_frames` evenly spread)."""
    scene_threshold: float = 0.1
    """Scene mode: a cut where the mean absolute change between thumbnails (0–1) exceeds this."""
    analysis_fps: float = 4.0
    """Scene mode: how often thumbnails are compared."""
    min_scene_s: float = 0.5
    """Scene mode: cuts closer than this to the previous one are ignored."""
    max_side: int = 448
    """Resize so the longer side is at most this many pixels (never upscaled); 0 keeps the size."""
    jpeg_quality: int = 90
    decoder: Literal["auto", "pyav", "opencv"] = "auto"
    """auto: PyAV, falling back to OpenCV when PyAV cannot read the file."""
    exact: bool = True
    """Decode up to the exact frame at each time; false takes the keyframe before it (one decode per
    frame, times off by up to the keyframe spacing; the recorded times are the frames' own)."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"frames.num_frames must be >= 1, got {self.num_frames}")
        if self.fps <= 0 or self.analysis_fps <= 0:
            raise ConfigError(f"frames.fps and frames.analysis_fps must be > 0, got {self.fps}, {self.analysis_fps}")
        if self.max_frames < 1:
            raise ConfigError(f"frames.max_frames must be >= 1, got {self.max_frames}")
        if not 0 < self.scene_threshold < 1:
            raise ConfigError(f"frames.scene_threshold must lie in (0, 1), got {self.scene_threshold}")
        if self.max_side < 0 or not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"frames.max_side must be >= 0 and frames.jpeg_quality 1–100, "
                              f"got {self.max_side}, {self.jpeg_quality}")


@dataclass
class SampledClip:
    """The frames taken from one clip (JPEG bytes) and the time of each in seconds."""

    frames: list[bytes]
    times: list[float]
    duration: float
    width: int
    height: int
    decoder: str
    scene_cuts: list[float] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {"frame_times": [round(t, 3) for t in self.times], "duration": round(self.duration, 3),
                "frame_size": [self.width, self.height], "decoder": self.decoder,
                "scene_cuts": [round(t, 3) for t in self.scene_cuts]}


# --- which times -------------------------------------------------------------------------------------


def uniform_times(duration: float, n: int) -> list[float]:
    """The centres of `n` equal slices of [0, duration)."""
    return [(i + 0.5) * duration / n for i in range(n)]


def fps_times(duration: float, fps: float, max_frames: int) -> list[float]:
    n = max(1, math.floor(duration * fps))
    if n > max_frames:
        return uniform_times(duration, max_frames)
    return [(k + 0.5) / fps for k in range(n)]


def scene_times(duration: float, cuts: list[float], n: int) -> list[float]:
    """`n` times over the scenes that `cuts` delimit: each scene at least one frame (the longest
    scenes when there are more scenes than frames), the rest in proportion to scene length, placed
    at the centres of equal slices of their scene."""
    bounds = [0.0, *cuts, duration]
    scenes = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if len(scenes) >= n:
        longest = sorted(range(len(scenes)), key=lambda i: (-(scenes[i][1] - scenes[i][0]), i))[:n]
        return [(scenes[i][0] + scenes[i][1]) / 2 for i in sorted(longest)]
    extra = n - len(scenes)
    share = [(b - a) / duration * extra for a, b in scenes]
    counts = [1 + int(s) for s in share]
    by_remainder = sorted(range(len(scenes)), key=lambda i: (-(share[i] - int(share[i])), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return [a + t for (a, b), k in zip(scenes, counts) for t in uniform_times(b - a, k)]


def find_cuts(thumbs: list[tuple[float, np.ndarray]], threshold: float, min_scene_s: float) -> list[float]:
    """Times where consecutive grey thumbnails differ by more than `threshold` (mean |Δ| / 255)."""
    cuts: list[float] = []
    for (_, prev), (t, cur) in zip(thumbs, thumbs[1:]):
        change = float(np.abs(cur.astype(np.int16) - prev.astype(np.int16)).mean()) / 255.0
        if change > threshold and t - (cuts[-1] if cuts else 0.0) >= min_scene_s:
            cuts.append(t)
    return cuts


# --- decoding ----------------------------------------------------------------------------------------


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _PyAV:
    """One open file: frames at wanted times by seeking, or every frame in order."""

    name = "pyav"

    def __init__(self, path: Path):
        import av

        self._av = av
        try:
            self.container = av.open(str(path))
            self.stream = self.container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError, UnicodeDecodeError) as exc:
            raise CorruptVideoError(f"cannot open video {path}: {exc}") from None
        self.path = path
        tb = self.stream.time_base
        self.start = float(self.stream.start_time * tb) if self.stream.start_time is not None else 0.0
        if self.stream.duration is not None:
            self.duration = float(self.stream.duration * tb)
        elif self.container.duration is not None:
            self.duration = self.container.duration / 1_000_000
        else:
            self.duration = 0.0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_s = 1 / float(rate) if rate else 0.04
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height

    def close(self) -> None:
        self.container.close()

    def every_frame(self) -> Iterator[tuple[float, Any]]:
        """(time from the clip start, frame) for every frame, decoding from the beginning."""
        try:
            self.container.seek(0)
            for frame in self.container.decode(self.stream):
                yield (frame.time or 0.0) - self.start, frame
        except self._av.error.FFmpegError as exc:
            raise CorruptVideoError(f"video {self.path} breaks off while decoding: {exc}") from None

    def at(self, times: list[float], exact: bool = True) -> list[tuple[float, Any]]:
        """For each time (sorted), the first frame shown at or after it, or the last frame of the clip;
        not `exact`: the keyframe at or before it."""
        out: list[tuple[float, Any]] = []
        frames: Iterator[Any] | None = None
        last: Any = None
        eps = self.frame_s / 2
        tb = self.stream.time_base
        try:
            for t in times:
                target = self.start + t
                if last is not None and last.time >= target - eps:
                    out.append((last.time - self.start, last))  # two targets within one frame
                    continue
                if frames is None or last is None or target - last.time > SEEK_GAP_S or not exact:
                    # lands on the keyframe at or before the target; decode forward from there
                    self.container.seek(int(target / tb), stream=self.stream, backward=True, any_frame=False)
                    frames, last = self.container.decode(self.stream), None
                for frame in frames:
                    last = frame
                    if not exact or frame.time is None or frame.time >= target - eps:
                        break
                if last is None:
                    raise CorruptVideoError(f"video {self.path} has no frame at {t:.2f}s")
                out.append(((last.time or 0.0) - self.start, last))
        except self._av.error.FFmpegError as exc:
            raise CorruptVideoError(f"video {self.path} breaks off while decoding: {exc}") from None
        return out

    @staticmethod
    def rgb(frame: Any, size: tuple[int, int]) -> Image.Image:
        return frame.to_image(width=size[0], height=size[1])

    @staticmethod
    def grey(frame: Any) -> np.ndarray:
        return frame.reformat(width=THUMB_SIZE[0], height=THUMB_SIZE[1], format="gray").to_ndarray()


class _OpenCV:
    """The fallback: OpenCV's own demuxer and decoder, seeking by milliseconds."""

    name = "opencv"

    def __init__(self, path: Path):
        import cv2

        self._cv2 = cv2
        self.path = path
        self.cap = cv2.VideoCapture(str(path))
        ok, first = self.cap.read() if self.cap.isOpened() else (False, None)
        if not ok:
            self.cap.release()
            raise CorruptVideoError(f"cannot open video {path} with OpenCV")
        fps = self.cap.get(cv2.CAP_PROP_FPS) or 25.0
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_s = 1 / fps
        self.duration = count / fps if count > 0 else 0.0
        self.height, self.width = first.shape[:2]
        self.start = 0.0

    def close(self) -> None:
        self.cap.release()

    def every_frame(self) -> Iterator[tuple[float, Any]]:
        self.cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
        k = 0
        while True:
            ok, img = self.cap.read()
            if not ok:
                return
            yield k * self.frame_s, img
            k += 1

    def at(self, times: list[float], exact: bool = True) -> list[tuple[float, Any]]:
        out = []  # OpenCV seeks by frame index and decodes up to it itself: always exact
        for t in times:
            k = min(max(0, math.ceil(t / self.frame_s - 0.5)), max(0, round(self.duration / self.frame_s) - 1))
            self.cap.set(self._cv2.CAP_PROP_POS_FRAMES, k)
            ok, img = self.cap.read()
            if not ok:
                raise CorruptVideoError(f"video {self.path}: OpenCV cannot read the frame at {t:.2f}s")
            out.append((k * self.frame_s, img))
        return out

    def rgb(self, img: np.ndarray, size: tuple[int, int]) -> Image.Image:
        if (img.shape[1], img.shape[0]) != size:
            img = self._cv2.resize(img, size, interpolation=self._cv2.INTER_AREA)
        return Image.fromarray(self._cv2.cvtColor(img, self._cv2.COLOR_BGR2RGB))

    def grey(self, img: np.ndarray) -> np.ndarray:
        small = self._cv2.resize(img, THUMB_SIZE, interpolation=self._cv2.INTER_AREA)
        return self._cv2.cvtColor(small, self._cv2.COLOR_BGR2GRAY)


def _open(path: Path, decoder: str) -> _PyAV | _OpenCV:
    if decoder == "opencv":
        return _OpenCV(path)
    try:
        return _PyAV(path)
    except CorruptVideoError as pyav_error:
        if decoder == "pyav":
            raise
        try:
            return _OpenCV(path)
        except CorruptVideoError as cv_error:
            raise CorruptVideoError(f"{pyav_error}; OpenCV fallback: {cv_error}") from None


def _duration(video: _PyAV | _OpenCV) -> float:
    """The clip length; when the container does not say, one pass over the frames."""
    if video.duration > 0:
        return video.duration
    last = None
    for last, _ in video.every_frame():
        pass
    if last is None:
        raise CorruptVideoError(f"video {video.path} holds no decodable frame")
    return last + video.frame_s


def _scene_cuts(video: _PyAV | _OpenCV, cfg: FrameSampling) -> list[float]:
    thumbs: list[tuple[float, np.ndarray]] = []
    step, next_t = 1 / cfg.analysis_fps, 0.0
    for t, frame in video.every_frame():
        if t >= next_t - 1e-6:
            thumbs.append((t, video.grey(frame)))
            next_t = t + step
    return find_cuts(thumbs, cfg.scene_threshold, cfg.min_scene_s)


def sample_frames(path: str | Path, cfg: FrameSampling | None = None,
                  pick: Callable[..., list[tuple[float, Any]]] | None = None) -> SampledClip:
    """Decode the frames `cfg` asks for from the video at `path` (a local file, or an s3:// / gs:// URI,
    copied to the local cache first); an unreadable file raises `CorruptVideoError` naming it. `pick`
    replaces the seeking decoder (benchmarks pass `by_full_decode` to compare)."""
    cfg = cfg or FrameSampling()
    path = storage.local_copy(path)
    video = _open(path, cfg.decoder)
    try:
        duration = _duration(video)
        cuts: list[float] = []
        if cfg.mode == "uniform":
            times = uniform_times(duration, cfg.num_frames)
        elif cfg.mode == "fps":
            times = fps_times(duration, cfg.fps, cfg.max_frames)
        else:
            cuts = _scene_cuts(video, cfg)
            times = scene_times(duration, cuts, cfg.num_frames)
        picked = pick(video, times) if pick else video.at(times, cfg.exact)
        size = _target_size(video.width, video.height, cfg.max_side)
        frames = [encode_jpeg(video.rgb(frame, size), cfg.jpeg_quality) for _, frame in picked]
        return SampledClip(frames=frames, times=[t for t, _ in picked], duration=duration, width=size[0],
                           height=size[1], decoder=video.name, scene_cuts=cuts)
    finally:
        video.close()


def by_full_decode(video: _PyAV | _OpenCV, times: list[float]) -> list[tuple[float, Any]]:
    """The frames `at` must return, found the slow way: decode every frame of the clip and keep,
    for each time, the first frame at or after it (else the last). Reference for tests and the
    benchmark's baseline."""
    eps = video.frame_s / 2
    out: list[tuple[float, Any] | None] = [None] * len(times)
    last = None
    for t, frame in video.every_frame():
        last = (t, frame)
        for i, want in enumerate(times):
            if out[i] is None and t >= want - eps:
                out[i] = last
    if last is None:
        raise CorruptVideoError(f"video {video.path} holds no decodable frame")
    return [o if o is not None else last for o in out]


def write_synthetic_clip(path: str | Path, seconds: float, fps: int = 24, size: tuple[int, int] = (640, 360),
                         scenes: int = 1, gop_s: float = 2.0, preset: str = "veryfast", seed: int = 0) -> Path:
    """An H.264 mp4 (PyAV) for tests and benchmarks, YouTube-like in what costs decode time: B-frames,
    a keyframe every `gop_s` seconds, and texture that moves. `scenes` equal scenes, each a random
    texture over its own brightness, panning a few pixels a frame."""
    import av

    path = Path(path)
    rng = np.random.default_rng(seed)
    width, height = size
    n = round(seconds * fps)
    # scene k is darker or brighter than its neighbours by a wide margin, so cuts are unmistakable
    levels = [40 + 140 * (k % 2) + int(rng.integers(0, 30)) for k in range(scenes)]
    textures = [rng.integers(0, 48, size=(height, width * 2, 3), dtype=np.uint8) for _ in range(min(scenes, 3))]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = max(1, round(gop_s * fps))
        stream.options = {"preset": preset, "scenecut": "0"}
        for k in range(n):
            scene = min(scenes - 1, k * scenes // n)
            x = (k * 3) % width
            img = textures[scene % len(textures)][:, x : x + width] + np.uint8(levels[scene])
            img[:, (k * 5) % (width - 8) :][:, :8] = 255  # a moving bar
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
