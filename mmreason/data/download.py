"""Fetching one video clip with yt-dlp's Python API, politely, and saying how it went.

    from mmreason.data.download import DownloadConfig, download_clip
    url = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
    result = download_clip(url, clip_id_for_url(url), Path("videos"), DownloadConfig())
    result.status, result.path      # "ok" and the file, or a failure status and `result.reason`

A URL is checked against the allow-list before any request: YouTube watch URLs, plus any http(s)
URL on a host named in `allowed_hosts`; every other scheme or host ends as `invalid-url`. yt-dlp
then runs with the format capped at `max_height` (video only: no ffmpeg is needed to merge),
`max_filesize`, a duration filter, sleeps between requests and its own retries; a rate-limited
attempt is retried here with exponential backoff. Failures never raise: they come back as one of
`STATUSES`, so a data job records them and carries on. Downloads are recorded in a yt-dlp download
archive, and a clip already on disk is not fetched again.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from mmreason.config import ConfigError

OK = "ok"
UNAVAILABLE = "unavailable"
RATE_LIMITED = "rate-limited"
TOO_LARGE = "too-large"
TOO_LONG = "too-long"
INVALID_URL = "invalid-url"
CORRUPT = "corrupt"
STATUSES = (OK, UNAVAILABLE, RATE_LIMITED, TOO_LARGE, TOO_LONG, INVALID_URL, CORRUPT)

YOUTUBE_HOSTS = ("youtube.com", "www.youtube.com", "m.youtube.com")
YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
PARTIAL_SUFFIXES = (".part", ".ytdl", ".temp")
# What yt-dlp says, lower-cased, for each failure kind (first match wins; the rest is unavailable).
ERROR_KINDS = (
    (RATE_LIMITED, ("http error 429", "too many requests", "rate-limit", "rate limit",
                    "confirm you’re not a bot", "confirm you're not a bot")),
    (TOO_LARGE, ("larger than max-filesize",)),
    (TOO_LONG, ("does not pass filter",)),
    (INVALID_URL, ("unsupported url", "is not a valid url")),
    (CORRUPT, ("content too short", "did not get any data blocks", "incomplete read", "connection broken")),
)


@dataclass
class DownloadConfig:
    """How clips are fetched: which URLs, which format, how politely."""

    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts (host or host:port) whose http(s) URLs may be fetched besides YouTube watch URLs."""
    max_height: int = 360
    """Format cap: the best video-only stream at most this many pixels high."""
    max_filesize: int = 50_000_000
    """Bytes; a larger file is not downloaded (too-large)."""
    max_duration_s: float = 600.0
    """Longer clips are skipped (too-long); yt-dlp filters on its metadata, the decoder checks again."""
    retries: int = 3
    """Retries per clip for rate limits (with backoff) and for yt-dlp's own network errors."""
    backoff_s: float = 5.0
    """First wait before a retry; doubles each time."""
    sleep_s: float = 1.0
    """Pause before each request to the host (yt-dlp's sleep_interval and sleep_interval_requests)."""
    concurrency: int = 2
    """At most this many clips are fetched and decoded at once (over the whole cluster)."""
    socket_timeout_s: float = 30.0
    keep_videos: bool = False
    """Keep the downloaded files after their frames are written (else they are deleted)."""
    video_dir: str = ""
    """Where videos go while they are processed; empty = OUTPUT_DIR/videos."""

    def __post_init__(self) -> None:
        if self.max_height < 1 or self.max_filesize < 1 or self.max_duration_s <= 0:
            raise ConfigError("download.max_height, download.max_filesize and download.max_duration_s must be > 0")
        if self.retries < 0 or self.backoff_s < 0 or self.sleep_s < 0:
            raise ConfigError("download.retries, download.backoff_s and download.sleep_s must be >= 0")
        if self.concurrency < 1:
            raise ConfigError(f"download.concurrency must be >= 1, got {self.concurrency}")
        for host in self.allowed_hosts:
            if not host or "/" in host or host.lower() in YOUTUBE_HOSTS:
                raise ConfigError(f"download.allowed_hosts: {host!r} must be a host or host:port "
                                  f"(YouTube watch URLs are always allowed)")


class InvalidUrl(ValueError):
    """A URL the allow-list refuses; the message says why."""


def youtube_id(url: str) -> str | None:
    """The video id of a YouTube watch URL (`youtube.com/watch?v=ID`, `youtu.be/ID`), else None."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https"):
        return None
    if host in YOUTUBE_HOSTS and parts.path == "/watch":
        vid = (parse_qs(parts.query).get("v") or [""])[0]
    elif host == "youtu.be":
        vid = parts.path.lstrip("/")
    else:
        return None
    return vid if YOUTUBE_ID.fullmatch(vid) else None


def check_url(url: str, allowed_hosts: list[str]) -> None:
    """Raise `InvalidUrl` unless `url` is a YouTube watch URL or an http(s) URL on an allowed host."""
    if youtube_id(url):
        return
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUrl(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidUrl(f"scheme {parts.scheme or '(none)'!r} is not allowed (only YouTube watch URLs and "
                         f"http(s) URLs on download.allowed_hosts)")
    host = (parts.hostname or "").lower()
    if host in YOUTUBE_HOSTS or host == "youtu.be":
        raise InvalidUrl("not a YouTube watch URL (want youtube.com/watch?v=<11-character id>)")
    allowed = {h.lower() for h in allowed_hosts}
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise InvalidUrl(f"host {host!r} is not on download.allowed_hosts")


def clip_id_for_url(url: str) -> str:
    """A stable file-safe id: `yt-<video id>` for YouTube, else `url-<hash of the URL>`."""
    vid = youtube_id(url)
    if vid:
        return f"yt-{vid}"
    return f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


@dataclass
class DownloadResult:
    status: str
    path: Path | None = None
    reason: str = ""
    attempts: int = 0
    downloaded: bool = False
    """False when the file was already on disk (no request made)."""


def classify(message: str) -> str:
    """The failure status for a yt-dlp error or log message."""
    text = message.lower()
    for status, needles in ERROR_KINDS:
        if any(n in text for n in needles):
            return status
    return UNAVAILABLE


class _Log:
    """Collects yt-dlp's messages (its `logger`), so a skipped download can be explained."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, msg: str) -> None:
        self.lines.append(msg)

    info = warning = error = debug


def existing_video(video_dir: Path, clip_id: str) -> Path | None:
    """A complete download of `clip_id` (yt-dlp renames a finished file from its .part name)."""
    for path in sorted(video_dir.glob(f"{clip_id}.*")):
        if path.suffix not in PARTIAL_SUFFIXES and path.is_file() and path.stat().st_size > 0:
            return path
    return None


def _ydl_options(cfg: DownloadConfig, video_dir: Path, clip_id: str, archive: Path | None, log: _Log) -> dict:
    import yt_dlp

    cap = cfg.max_height
    backoff = lambda n: cfg.backoff_s * 2 ** max(0, n - 1)  # noqa: E731 - yt-dlp wants a callable
    return {
        "outtmpl": str(video_dir / f"{clip_id}.%(ext)s"),
        "format": f"bv*[height<=?{cap}][ext=mp4]/bv*[height<=?{cap}]/wv*",
        "max_filesize": cfg.max_filesize,
        "match_filter": yt_dlp.utils.match_filter_func(f"duration <=? {cfg.max_duration_s}"),
        "download_archive": str(archive) if archive else None,
        "retries": cfg.retries,
        "fragment_retries": cfg.retries,
        "extractor_retries": cfg.retries,
        "retry_sleep_functions": {"http": backoff, "fragment": backoff, "extractor": backoff},
        "sleep_interval": cfg.sleep_s,
        "sleep_interval_requests": cfg.sleep_s,
        "socket_timeout": cfg.socket_timeout_s,
        "noplaylist": True,
        "quiet": True,
        "noprogress": True,
        "no_warnings": False,
        "logger": log,
        "overwrites": False,
        "continuedl": False,
        "cachedir": False,
    }


def _attempt(url: str, clip_id: str, video_dir: Path, cfg: DownloadConfig, archive: Path | None) -> DownloadResult:
    import yt_dlp

    log = _Log()
    try:
        with yt_dlp.YoutubeDL(_ydl_options(cfg, video_dir, clip_id, archive, log)) as ydl:
            ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as exc:
        message = str(exc.msg if hasattr(exc, "msg") else exc).removeprefix("ERROR: ")
        return DownloadResult(classify(message), reason=message)
    path = existing_video(video_dir, clip_id)
    if path is not None:
        if path.stat().st_size > cfg.max_filesize:  # a server that did not say how big it was
            path.unlink()
            return DownloadResult(TOO_LARGE, reason=f"file is larger than max_filesize ({cfg.max_filesize} bytes)")
        return DownloadResult(OK, path=path, downloaded=True)
    said = " ".join(log.lines)
    if archive is not None and "already been recorded in the archive" in said:
        # the archive says done but the file is gone (deleted after an earlier run): fetch it again
        return _attempt(url, clip_id, video_dir, cfg, archive=None)
    reason = next((line.strip() for line in reversed(log.lines) if classify(line) != UNAVAILABLE),
                  log.lines[-1].strip() if log.lines else "yt-dlp wrote no file")
    return DownloadResult(classify(reason), reason=reason)


def download_clip(url: str, clip_id: str, video_dir: Path, cfg: DownloadConfig,
                  archive: Path | None = None) -> DownloadResult:
    """Fetch `url` into `video_dir/<clip_id>.<ext>`; never raises for a bad URL or a failed fetch."""
    try:
        check_url(url, cfg.allowed_hosts)
    except InvalidUrl as exc:
        return DownloadResult(INVALID_URL, reason=str(exc))
    video_dir.mkdir(parents=True, exist_ok=True)
    path = existing_video(video_dir, clip_id)
    if path is not None:
        return DownloadResult(OK, path=path, downloaded=False)
    for attempt in range(1, cfg.retries + 2):
        result = _attempt(url, clip_id, video_dir, cfg, archive)
        result.attempts = attempt
        if result.status != RATE_LIMITED or attempt > cfg.retries:
            return result
        time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
