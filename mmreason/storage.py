"""Where data lives: a local path, or an object-store URI (`s3://bucket/prefix`, `gs://bucket/prefix`).

    from mmreason import storage
    root = storage.check_location(cfg.output_dir, "output_dir")      # ConfigError for `http://…`, `s3:/x`, …
    storage.write_text_atomic(storage.join(root, "manifest.json"), text)
    fs, path = storage.filesystem(root)                               # for pyarrow / Ray Data
    storage_path, storage_filesystem = storage.ray_storage(root)      # for ray.train.RunConfig

A location is a plain `str`; never wrap a URI in `pathlib.Path` (it turns `s3://b/x` into `s3:/b/x`,
which is how `output_dir=s3://…` used to become a local folder `./s3:/…`). Every function here takes
either kind and does the same thing on both:

- A write is all-or-nothing. Locally: a temporary file in the same folder, fsync, `os.replace`. On an
  object store: the whole object goes up in one request (PutObject; a large one as a multipart upload
  that S3/GCS only publish when it completes), so readers see the old object or the new, never half
  (`read_bytes` re-reads an object replaced while it read it; ranged Parquet reads assume a shard is
  not replaced while they run). Object stores have no rename, so a tree is made all-or-nothing by
  its writer: files first, a marker or manifest last (`upload_dir` leaves that last step to its caller).
- The object store's endpoint, region and credentials come from the environment, as boto3 reads them:
  `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (pyarrow 25 does not read these itself), `AWS_DEFAULT_REGION`
  / `AWS_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, else the SDK's own
  chain (profile, instance role); for gs://, `STORAGE_EMULATOR_HOST` and Google's default credentials.
  Each process builds its filesystem from its own environment, so on a cluster every node needs them
  (instance role or the job's runtime_env) — Ray workers started before the variables were set do not
  see them. A filesystem object (`filesystem`, `ray_storage`) carries explicit settings with it when
  pickled, so Ray Data and Ray Train tasks handed one use the driver's.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import posixpath
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from mmreason.config import ConfigError

SCHEMES = ("s3", "gs")
SUPPORTED = "a local path, s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]"
TMP_MARK = ".tmp-"  # in the name of a local file being written; never in a finished one
CACHE_ENV = "MMREASON_CACHE"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_URI = re.compile(r"^(s3|gs)://([^/]*)(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# A colon after these is a scheme even without `//` (`s3:/x`, `file:/x`); any `name://` is one too, while a
# local name with a colon in it (`runs/a:b`, `a:b`) stays a path.
_KNOWN_SCHEMES = (*SCHEMES, "file", "s3a", "s3n", "gcs", "http", "https", "hdfs", "abfs", "az")
_HINTS = {"s3a": "write s3://", "s3n": "write s3://", "gcs": "write gs://"}
# The environment an object store's settings come from: a filesystem is rebuilt when one of these changes.
_ENV = {
    "s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"),
    "gs": ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"),
}
_COPY_CHUNK = 8 << 20
_READ_TRIES = 10


# --- naming ---------------------------------------------------------------------------------------------


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is an object-store URI (`s3://…`, `gs://…`) rather than a local path."""
    return isinstance(location, str) and location.startswith(tuple(f"{s}://" for s in SCHEMES))


def _refuse(value: str, setting: str, why: str) -> ConfigError:
    return ConfigError(f"{setting}: {value!r} is not a supported location ({why}); use {SUPPORTED}")


def _normalise_uri(value: str) -> str:
    """`s3://bucket/a//b/` → `s3://bucket/a/b`; ValueError (the reason) for a malformed one."""
    scheme, _, rest = value.partition(":")
    match = _URI.match(f"{scheme.lower()}:{rest}")
    if match is None:
        raise ValueError(f"write {value.split(':', 1)[0]}://BUCKET/PREFIX, with two slashes")
    scheme, bucket, key = match.groups()
    if not bucket:
        raise ValueError("no bucket name")
    if not _BUCKET.match(bucket):
        raise ValueError(f"{bucket!r} is not a bucket name (3–222 lowercase letters, digits, '.', '-', '_')")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError("'.' and '..' have no meaning in an object key")
    return "/".join([f"{scheme}://{bucket}", *parts])


def check_location(value: str, setting: str) -> str:
    """`value` checked as a place to read or write data: a local path comes back absolute, an `s3://` or
    `gs://` URI normalised (no trailing or doubled slashes). Anything else with a scheme (`http://`,
    `hdfs://`, `s3:/x`, a missing bucket) raises `ConfigError` naming `setting`, the value and the
    supported forms; `file:///abs/path` is taken as the local path."""
    value = str(value)
    if not value.strip():
        raise _refuse(value, setting, "it is empty")
    match = _SCHEME.match(value)
    scheme = match.group(1).lower() if match else None
    if scheme is None or (scheme not in _KNOWN_SCHEMES and not value[match.end():].startswith("//")):
        return str(Path(value).expanduser().resolve())
    if scheme == "file":
        rest = value[match.end():]
        if rest.startswith("//"):
            host, _, rest = rest[2:].partition("/")
            if host not in ("", "localhost"):
                raise _refuse(value, setting, f"file:// names another host {host!r}")
            rest = "/" + rest
        if not rest.startswith("/"):
            raise _refuse(value, setting, "a file: URI needs an absolute path")
        return str(Path(rest).resolve())
    if scheme not in SCHEMES:
        hint = _HINTS.get(scheme, f"scheme {scheme}:// is not supported")
        raise _refuse(value, setting, hint)
    try:
        return _normalise_uri(value)
    except ValueError as exc:
        raise _refuse(value, setting, str(exc)) from None


def _remote(location: str | os.PathLike) -> bool:
    """`is_remote`, refusing a URI that lost a slash (`s3:/b/x`: it went through pathlib.Path, or a typo)
    instead of taking it for a local folder named `s3:`."""
    if is_remote(location):
        return True
    match = _SCHEME.match(os.fspath(location))
    if match and match.group(1).lower() in SCHEMES:
        raise ValueError(f"{os.fspath(location)!r} is not a valid location: write {match.group(1)}://BUCKET/PREFIX "
                         f"(and keep URIs as str, not pathlib.Path)")
    return False


def _split(location: str | os.PathLike) -> tuple[str | None, str]:
    """(scheme, "bucket/key") for a URI, (None, absolute path) for a local path."""
    if not _remote(location):
        return None, os.path.abspath(os.fspath(location))
    uri = _normalise_uri(location)
    scheme, path = uri.split("://", 1)
    return scheme, path


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / `parts` (each may hold `/`), as a str of the same kind."""
    if _remote(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
    return os.path.join(os.fspath(location), *parts)


# --- filesystems ----------------------------------------------------------------------------------------


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `location` and the path on it: `LocalFileSystem` and the absolute path,
    or an `S3FileSystem` / `GcsFileSystem` configured from the environment and `"bucket/key"`."""
    scheme, path = _split(location)
    if scheme is None:
        return _local(), path
    return _object_store(scheme, tuple(os.environ.get(name) for name in _ENV[scheme])), path


@functools.cache
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.lru_cache(maxsize=8)
def _object_store(scheme: str, env_values: tuple[str | None, ...]) -> pafs.FileSystem:
    env = {k: v for k, v in zip(_ENV[scheme], env_values) if v}
    if scheme == "gs":
        kwargs = {}
        if "STORAGE_EMULATOR_HOST" in env:  # the GCS emulator convention google-cloud-storage follows
            url = _endpoint("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"], default_scheme="http")
            kwargs = {"endpoint_override": url.netloc, "scheme": url.scheme, "anonymous": True}
        return pafs.GcsFileSystem(**kwargs)
    # small objects go up as one PutObject (no CreateMultipartUpload round trip first)
    kwargs = {"allow_delayed_open": True}
    name = "AWS_ENDPOINT_URL_S3" if "AWS_ENDPOINT_URL_S3" in env else "AWS_ENDPOINT_URL"
    if name in env:
        url = _endpoint(name, env[name])
        kwargs.update(endpoint_override=url.netloc + url.path.rstrip("/"), scheme=url.scheme)
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    if "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env:
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      session_token=env.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def _endpoint(name: str, value: str, default_scheme: str | None = None):
    url = urlsplit(value if "://" in value or default_scheme is None else f"{default_scheme}://{value}")
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(f"{name}={value!r} is not an endpoint URL like http://HOST:PORT or https://HOST")
    return url


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """What `ray.train.RunConfig(storage_path=…, storage_filesystem=…)` needs for `location`: a local
    absolute path and None, or the scheme-less `bucket/prefix` and the filesystem (which carries the
    endpoint, so an S3-compatible store works too)."""
    scheme, path = _split(location)
    return (path, None) if scheme is None else (path, filesystem(location)[0])


# --- files ----------------------------------------------------------------------------------------------


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def _missing(location: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(location))


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder (on an object store: an object or a prefix with objects) is there."""
    if not _remote(location):
        return Path(location).exists()
    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    if not _remote(location):
        return Path(location).is_dir()
    return _info(location).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int:
    """A file's size in bytes; FileNotFoundError naming it when there is none."""
    if not _remote(location):
        return Path(location).stat().st_size
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise _missing(location)
    return info.size


def read_bytes(location: str | os.PathLike) -> bytes:
    """A file's bytes; FileNotFoundError naming `location` when there is none."""
    if not _remote(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    # pyarrow asks for the object's size (HEAD), then GETs that many bytes: an object replaced in between
    # comes back cut to the old size (seen: a manifest rewritten by a running job read back as broken
    # JSON). So the read counts only if the object's metadata (ETag, size, time) is the same after it.
    for attempt in range(_READ_TRIES):
        try:
            with fs.open_input_stream(path) as stream:
                before, data = stream.metadata(), stream.read()
            with fs.open_input_stream(path) as stream:
                after = stream.metadata()
        except FileNotFoundError:
            raise _missing(location) from None
        if before == after:
            return data
        time.sleep(0.01 * 2**attempt)  # 10 ms … 5 s: a manifest is rewritten once per finished shard
    raise OSError(f"{location} kept changing while it was read ({_READ_TRIES} tries)")


def read_text(location: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(location).decode(encoding)


def write_bytes_atomic(location: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` so that readers see the old file or the new one, never part of it (a local parent
    folder is created; `data` may be any bytes-like object, a `pyarrow.Buffer` too)."""
    data = memoryview(data)  # a type error here, before anything is opened
    if _remote(location):
        fs, path = filesystem(location)
        # One write then close: an S3/GCS stream publishes whatever it holds when closed (even on an
        # error, from its destructor), so nothing may fail between opening it and handing it everything.
        stream = fs.open_output_stream(path)
        stream.write(data)
        stream.close()
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(location: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(location, text.encode(encoding))


def remove(location: str | os.PathLike) -> None:
    """Delete a file or a whole tree; nothing there is not an error. A bucket itself is emptied, not deleted;
    on an object store pyarrow leaves an empty folder marker (`parent/`) so the parent still lists."""
    if not _remote(location):
        path = Path(location)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        # a folder that exists only as its objects' prefix is gone now; one with a marker object (`path/`)
        # still lists, and deleting that marker is left to delete_dir (GCS answers 404 for a marker that
        # was never written, where S3 answers 204)
        if "/" in path and fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Files under the folder `location` as sorted POSIX paths relative to it (empty when it is missing)."""
    if not _remote(location):
        root = Path(location)
        if not root.is_dir():
            return []
        found = root.rglob("*") if recursive else root.iterdir()
        return sorted(p.relative_to(root).as_posix() for p in found if p.is_file())
    fs, path = filesystem(location)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    return sorted(info.path[len(path) + 1:] for info in fs.get_file_info(selector)
                  if info.type == pafs.FileType.File)


# --- trees ----------------------------------------------------------------------------------------------


def upload_dir(local_dir: str | os.PathLike, location: str, threads: int = 8) -> list[str]:
    """Copy every file under `local_dir` to `location` (same relative paths); returns them. Only files
    are written (no folder markers), so the caller makes the tree complete by writing its marker or
    manifest after this returns. A file whose upload fails may be left behind in part: the caller's
    marker is what says the tree is whole."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(errno.ENOENT, "not a folder", str(local_dir))
    files = list_files(local_dir)
    fs, root = filesystem(location)
    remote = _remote(location)

    def put(rel: str) -> None:
        target = posixpath.join(root, rel) if remote else os.path.join(root, rel)
        if not remote:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(local_dir / rel, "rb") as src, fs.open_output_stream(target) as dst:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)

    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        list(pool.map(put, files))
    return files


def download_dir(location: str, local_dir: str | os.PathLike, threads: int = 8) -> Path:
    """Copy the tree at `location` into `local_dir` (created); returns `local_dir`."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise _missing(location)
    return download_tree(fs, path, local_dir, threads)


def download_tree(fs: pafs.FileSystem, path: str, local_dir: str | os.PathLike, threads: int = 8) -> Path:
    """Copy the folder `path` on `fs` into `local_dir` (created); returns `local_dir`. The local folders
    are made first: pyarrow's GcsFileSystem lists a tree's objects without the folders they imply, and
    `pyarrow.fs.copy_files` (Ray Train's checkpoint download too) then fails to open `a/b/x.bin` under
    a missing `a/b`."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    root = path.rstrip("/") + "/"
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and info.path.startswith(root):
            (local_dir / info.path[len(root):]).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir.resolve()), source_filesystem=fs, destination_filesystem=_local(),
                    use_threads=threads > 1)
    return local_dir


def cache_root() -> Path:
    """Where local copies of remote data go: `$MMREASON_CACHE`, else `~/.cache/mmreason`."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mmreason").expanduser()


def local_copy(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path holding what `location` holds — for code that needs one (`from_pretrained`, a
    video decoder, a zip reader). A local path comes back as it is. A URI (a tree or one file) is
    downloaded once into `cache_dir/<sha of the URI>` (default `cache_root()/storage`), completed
    atomically (a temporary folder renamed into place), and re-used afterwards without asking the
    store again: a URI whose content changes needs a new name, or its cache entry removed."""
    if not _remote(location):
        return Path(location)
    uri = check_location(location, "location")
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "storage"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    tree, single = cache / digest, cache / f"{digest}-file"
    name = uri.rsplit("/", 1)[1]
    if tree.is_dir():
        return tree
    if (single / name).is_file():
        return single / name
    kind = _info(uri).type
    if kind == pafs.FileType.NotFound:
        raise _missing(uri)
    target = tree if kind == pafs.FileType.Directory else single
    tmp = cache / f".{digest}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        if kind == pafs.FileType.Directory:
            download_dir(uri, tmp)
        else:
            tmp.mkdir(parents=True)
            fs, path = filesystem(uri)
            pafs.copy_files(path, str((tmp / name).resolve()), source_filesystem=fs, destination_filesystem=_local())
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target if kind == pafs.FileType.Directory else target / name
