"""Test media: a loopback HTTP server for generated clips, and CinePile-shaped source rows."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from mmreason.data.cinepile import COLUMNS


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args: Any, server_state: "ClipServer", **kwargs: Any):
        self.state = server_state
        super().__init__(*args, **kwargs)

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, with_body: bool) -> None:
        self.state.requests.append((self.command, self.path))
        name = self.path.lstrip("/")
        if name.startswith("ratelimited"):
            self.send_error(429, "Too Many Requests")
            return
        body = self.state.files.get(name)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # a client that read only the headers
                pass

    def do_GET(self) -> None:
        self._reply(True)

    def do_HEAD(self) -> None:
        self._reply(False)


class ClipServer:
    """Serves `files` (name → bytes) on 127.0.0.1; `ratelimited*` answers 429, anything else 404.
    Every request is logged as (method, path)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str]] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, server_state=self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"http://{self.host}/{name}"

    def gets(self) -> Counter:
        return Counter(path.lstrip("/") for method, path in self.requests if method == "GET")

    def __enter__(self) -> "ClipServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CATEGORIES = ("Character and Relationship Dynamics", "Narrative and Plot Analysis", "Temporal")


def cinepile_row(url: str, k: int, **override: Any) -> dict[str, Any]:
    """One row with exactly the official columns; question k of the clip at `url`."""
    choices = [f"option {k}-{j}" for j in range(5)]
    position = k % 5
    row = {
        "movie_name": "Test Movie", "year": 1999, "genre": ["Drama"], "yt_clip_title": f"Clip {url}",
        "yt_clip_link": url, "movie_scene": "a scene", "subtitles": f"<subs of {url}>",
        "question": f"What happens in question {k}?", "choices": choices, "answer_key": choices[position],
        "answer_key_position": position, "question_category": CATEGORIES[k % len(CATEGORIES)],
        "hard_split": "True" if k % 2 else "False", "visual_reliance": "True" if k % 3 else "False",
    }
    row.update(override)
    assert set(row) == set(COLUMNS)
    return row


def cinepile_rows(questions: dict[str, int]) -> list[dict[str, Any]]:
    """`questions[url]` rows per clip, clip by clip."""
    return [cinepile_row(url, k) for url, n in questions.items() for k in range(n)]


def truncated(data: bytes) -> bytes:
    """The first half of a file: an mp4 whose index (moov) never arrives."""
    return data[: len(data) // 2]


def write_json_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    import json

    path.write_text(json.dumps(rows))
    return path
