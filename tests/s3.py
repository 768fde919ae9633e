"""A real S3-API server on loopback for tests: moto's server (`python -m moto.server`), spoken to over
the S3 wire protocol by pyarrow and boto3 exactly as a real bucket would be — nothing in mmreason is
mocked. Use it from a test file with

    from tests.s3 import s3, s3_server  # noqa: F401  (pytest fixtures)

    def test_x(s3):                     # env points at the server; s3.uri is a fresh s3:// prefix
        storage.write_text_atomic(f"{s3.uri}/a.txt", "hi")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

BUCKET = "mmreason-test"
# Variables that would point pyarrow or boto3 elsewhere; cleared while a test talks to the server.
OTHER_AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the server, as the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        """Every object key under `prefix` (bucket-relative), as S3 lists them."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@dataclass(frozen=True)
class BucketPrefix:
    server: Any
    """The store's server: `.bucket` and `.keys(prefix)` (S3Server, tests.gcs.GcsServer)."""
    prefix: str
    """A fresh key prefix in the bucket, for one test."""
    scheme: str = "s3"

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.server.bucket}/{self.prefix}"

    def keys(self) -> list[str]:
        """Keys under this test's prefix, relative to it."""
        return [k[len(self.prefix) + 1:] for k in self.server.keys(self.prefix + "/")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def loopback_server(argv: list[str], probe: str, what: str) -> Iterator[None]:
    """Run `argv` in its own process group until `probe` (a URL) answers — then the block — and kill
    the group at the end, whatever happened."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(probe, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{what} did not answer on {probe} (exit {proc.poll()})")
                time.sleep(0.2)
        yield
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, in its own process group (killed as a group at the
    end), with one bucket."""
    port = _free_port()
    server = S3Server(f"http://127.0.0.1:{port}", BUCKET)
    with loopback_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         server.endpoint, "moto server"):
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The standard AWS variables pointed at the server for this test, and a fresh prefix in its bucket."""
    for name in OTHER_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return BucketPrefix(s3_server, f"t-{uuid.uuid4().hex[:10]}")
