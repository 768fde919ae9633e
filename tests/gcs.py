"""A GCS-API server on loopback for tests: gcp-storage-emulator (`python -m gcp_storage_emulator`),
spoken to over the Cloud Storage JSON API by pyarrow's `GcsFileSystem` exactly as a real bucket would
be, pointed at it by `STORAGE_EMULATOR_HOST` as Google's clients are — nothing in mmreason is mocked.
Use it from a test file with

    from tests.gcs import gcs, gcs_server  # noqa: F401  (pytest fixtures)

    def test_x(gcs):                        # env points at the server; gcs.uri is a fresh gs:// prefix
        storage.write_text_atomic(f"{gcs.uri}/a.txt", "hi")
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from tests.s3 import BucketPrefix, _free_port, loopback_server

BUCKET = "mmreason-test"
# Variables that would point pyarrow at real Google Cloud; cleared while a test talks to the server.
OTHER_GCS_ENV = ("GOOGLE_APPLICATION_CREDENTIALS",)


@dataclass(frozen=True)
class GcsServer:
    host: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the server: the emulator variable Google's clients read."""
        return {"STORAGE_EMULATOR_HOST": f"http://{self.host}"}

    def keys(self, prefix: str) -> list[str]:
        """Every object name under `prefix` (bucket-relative), as the JSON API lists them."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            with urllib.request.urlopen(f"http://{self.host}/storage/v1/b/{self.bucket}/o?{query}") as reply:
                page = json.load(reply)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator on a free loopback port (in memory), in its own process group (killed as a
    group at the end), with one bucket."""
    port = _free_port()
    server = GcsServer(f"127.0.0.1:{port}", BUCKET)
    with loopback_server([sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port",
                          str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
                         f"http://{server.host}/storage/v1/b/{BUCKET}", "GCS emulator"):
        yield server


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """STORAGE_EMULATOR_HOST pointed at the server for this test, and a fresh prefix in its bucket."""
    for name in OTHER_GCS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in gcs_server.env.items():
        monkeypatch.setenv(name, value)
    return BucketPrefix(gcs_server, f"t-{uuid.uuid4().hex[:10]}", "gs")
