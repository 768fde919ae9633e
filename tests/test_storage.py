"""mmreason.storage and the data layer on an object store: a real S3-API server (moto) and a real
GCS-API server (gcp-storage-emulator) on loopback, spoken to over the wire by pyarrow — locations
checked, atomic writes, trees up and down, Ray Train checkpoints and the grid-world job writing to
s3:// and gs:// end to end, and a job killed mid-write then re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest

from mmreason import storage
from mmreason.config import ConfigError, load_config
from mmreason.data import ray_dataset, read_table
from mmreason.data import shards
from mmreason.data.gridworld import GridworldConfig, build_shard, plan_shards, shard_info
from mmreason.data.reader import shard_paths
from mmreason.data.shards import read_manifest, read_shard_info, write_shard
from mmreason.train.worker import checkpoint_directory
from tests.gcs import gcs, gcs_server  # noqa: F401  (pytest fixtures)
from tests.s3 import s3, s3_server  # noqa: F401  (pytest fixtures)

BAD_LOCATIONS = [
    ("http://example.com/data", "scheme http:// is not supported"),
    ("https://bucket.s3.amazonaws.com/x", "scheme https:// is not supported"),
    ("hdfs://namenode/data", "scheme hdfs:// is not supported"),
    ("s3:/bucket/x", "with two slashes"),
    ("s3:bucket", "with two slashes"),
    ("gs:/bucket", "with two slashes"),
    ("s3://", "no bucket name"),
    ("s3:///prefix", "no bucket name"),
    ("gs:///prefix", "no bucket name"),
    ("s3://My_Bucket/x", "is not a bucket name"),
    ("s3://bucket/a/../b", "have no meaning in an object key"),
    ("s3a://bucket/x", "write s3://"),
    ("gcs://bucket/x", "write gs://"),
    ("file://otherhost/data", "names another host"),
    ("", "it is empty"),
]


@pytest.mark.parametrize("value, why", BAD_LOCATIONS)
def test_check_location_refuses_every_bad_form_naming_the_setting(value, why):
    with pytest.raises(ConfigError) as err:
        storage.check_location(value, "output_dir")
    message = str(err.value)
    assert message.startswith(f"output_dir: {value!r} is not a supported location")
    assert why in message and "s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]" in message


def test_check_location_normalises_the_good_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.check_location("runs/data", "output_dir") == str(tmp_path / "runs/data")
    assert storage.check_location("a:b", "output_dir") == str(tmp_path / "a:b")  # a colon alone is no scheme
    assert storage.check_location(f"file://{tmp_path}/x", "output_dir") == str(tmp_path / "x")
    assert storage.check_location(f"file:{tmp_path}/y/", "output_dir") == str(tmp_path / "y")
    assert storage.check_location("s3://my-bucket/a//b/", "output_dir") == "s3://my-bucket/a/b"
    assert storage.check_location("gs://my-bucket/", "output_dir") == "gs://my-bucket"
    assert storage.is_remote("s3://my-bucket/a") and storage.is_remote("gs://my-bucket")
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(Path("s3://my-bucket/a"))
    assert storage.join("s3://my-bucket/a/", "train/x.parquet") == "s3://my-bucket/a/train/x.parquet"
    assert list(tmp_path.iterdir()) == []


def test_a_uri_mangled_by_pathlib_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mangled = Path("s3://my-bucket/data/x.json")  # pathlib makes this 's3:/my-bucket/data/x.json'
    for op in (storage.exists, storage.read_bytes, storage.list_files, storage.remove, storage.filesystem):
        with pytest.raises(ValueError, match="write s3://BUCKET/PREFIX"):
            op(mangled)
    with pytest.raises(ValueError, match="keep URIs as str"):
        storage.write_bytes_atomic(mangled, b"{}")
    assert list(tmp_path.iterdir()) == []


def test_filesystem_takes_endpoint_region_and_credentials_from_the_environment(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.internal:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    fs, path = storage.filesystem("s3://my-bucket/a/b")
    options = fs.__reduce__()[1][0]  # what travels with the filesystem when it is pickled to a Ray task
    assert path == "my-bucket/a/b" and isinstance(fs, pafs.S3FileSystem)
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("minio.internal:9000", "https",
                                                                                      "eu-west-1")
    assert (options["access_key"], options["secret_key"], options["session_token"]) == ("key", "secret", "token")
    assert storage.filesystem("s3://other-bucket")[0] is fs  # cached while the environment stays the same
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the S3-specific one wins, as in boto3
    options = storage.filesystem("s3://my-bucket")[0].__reduce__()[1][0]
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9", "http")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "minio:9000")
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL_S3='minio:9000' is not an endpoint URL"):
        storage.filesystem("s3://my-bucket")
    local, where = storage.filesystem("relative/dir")
    assert isinstance(local, pafs.LocalFileSystem) and where == os.path.abspath("relative/dir")


@pytest.fixture(params=["local", "s3", "gs"])
def root(request, tmp_path):
    """A fresh dataset location of each kind."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue({"s3": "s3", "gs": "gcs"}[request.param]).uri


@pytest.fixture(params=["s3", "gs"])
def store(request):
    """A fresh prefix on each kind of object store (moto's S3 server, the GCS emulator)."""
    return request.getfixturevalue({"s3": "s3", "gs": "gcs"}[request.param])


def test_files_round_trip_alike_on_both_kinds_of_location(root):
    nested = storage.join(root, "train", "a.bin")
    assert not storage.exists(nested) and storage.list_files(root) == []
    storage.write_bytes_atomic(nested, b"\x00\x01" * 1000)
    storage.write_text_atomic(storage.join(root, "manifest.json"), '{"x": 1}')
    storage.write_text_atomic(storage.join(root, "manifest.json"), '{"x": 2}')  # replaced whole
    assert storage.read_bytes(nested) == b"\x00\x01" * 1000 and storage.size(nested) == 2000
    assert json.loads(storage.read_text(storage.join(root, "manifest.json"))) == {"x": 2}
    assert storage.exists(storage.join(root, "train")) and storage.is_dir(storage.join(root, "train"))
    assert not storage.is_dir(nested)
    assert storage.list_files(root) == ["manifest.json", "train/a.bin"]
    assert storage.list_files(root, recursive=False) == ["manifest.json"]
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(storage.join(root, "missing.bin"))
    storage.remove(nested)
    assert storage.list_files(root) == ["manifest.json"]
    storage.remove(storage.join(root, "nothing-here"))  # not an error
    storage.write_bytes_atomic(nested, b"again")
    storage.remove(root)
    assert storage.list_files(root) == [] and not storage.exists(root)


def test_reads_see_whole_versions_of_an_object_being_rewritten(store):
    """A job rewrites its manifest after every shard while others read it: every read is one whole
    version (pyarrow alone returns the new version cut to the old length, broken JSON)."""
    manifest = storage.join(store.uri, "manifest.json")
    versions = [json.dumps({"shards": ["x" * 40] * n}) for n in range(1, 8)]
    storage.write_text_atomic(manifest, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            storage.write_text_atomic(manifest, versions[i % len(versions)])
            stop.wait(0.05)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = [storage.read_text(manifest) for _ in range(100)]
    finally:
        stop.set()
        writer.join()
    assert set(seen) <= set(versions) and len(set(seen)) > 1


def tiny_rows(n: int = 4) -> tuple[list[dict], dict]:
    cfg = load_config(GridworldConfig, None, ["examples=10", "tasks={maze: {sizes: [3]}}", "image_size=32",
                                              "step_images=false"])
    spec = plan_shards(cfg)[0]
    rows, _ = build_shard(cfg, spec)
    return rows[:n], shard_info(cfg, spec)


def test_a_shard_write_cut_short_leaves_the_old_shard_and_no_new_object(root, monkeypatch):
    rows, info = tiny_rows()
    shard = storage.join(root, "train", "maze-n3-0000.parquet")
    write_shard(shard, rows, info)
    real_write_table = shards.pq.write_table

    def dies_halfway(table, where, **kwargs):
        where.write(b"PAR1 half a shard")
        raise OSError("killed mid-write")

    monkeypatch.setattr(shards.pq, "write_table", dies_halfway)
    with pytest.raises(OSError, match="killed mid-write"):
        write_shard(shard, rows[:2], info)  # would replace the 4-row shard
    with pytest.raises(OSError, match="killed mid-write"):
        write_shard(storage.join(root, "train", "maze-n3-0001.parquet"), rows, info)
    monkeypatch.setattr(shards.pq, "write_table", real_write_table)
    assert read_shard_info(shard)["rows"] == 4
    assert storage.list_files(root) == ["train/maze-n3-0000.parquet"]  # no temp file, no half object
    assert shards.read_shard(shard, columns=["id"]).column("id").to_pylist() == [r["id"] for r in rows]


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"config.json": b'{"hidden": 8}', "model.safetensors": os.urandom(3 << 20),
             "tokenizer/vocab.txt": b"a\nb\n", "tokenizer/deep/x.bin": b"\x00" * 7}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_trees_go_up_and_come_down_and_local_copy_downloads_once(store, tmp_path, monkeypatch):
    files = make_tree(tmp_path / "ckpt")
    uri = storage.join(store.uri, "ckpt")
    assert sorted(storage.upload_dir(tmp_path / "ckpt", uri)) == sorted(files)
    assert store.keys() == sorted(f"ckpt/{rel}" for rel in files)  # files only: no folder-marker objects
    storage.write_text_atomic(storage.join(uri, "COMPLETE"), "")  # the caller's marker, last
    down = storage.download_dir(uri, tmp_path / "down")
    assert {rel: (down / rel).read_bytes() for rel in files} == files

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    copy = storage.local_copy(uri)
    assert copy.parent == tmp_path / "cache" / "storage" and (copy / "COMPLETE").is_file()
    assert {rel: (copy / rel).read_bytes() for rel in files} == files
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    one = storage.local_copy(storage.join(uri, "config.json"))
    assert one.name == "config.json" and one.read_bytes() == files["config.json"]
    storage.remove(uri)  # re-used from the cache without asking the store again
    assert storage.local_copy(uri) == copy and storage.local_copy(storage.join(uri, "config.json")) == one
    with pytest.raises(FileNotFoundError, match="ckpt/missing"):
        storage.local_copy(storage.join(uri, "missing"))
    assert storage.local_copy(str(tmp_path / "ckpt")) == tmp_path / "ckpt"  # a local path is used in place


def test_ray_storage_gives_ray_train_a_path_and_filesystem(store, tmp_path):
    assert storage.ray_storage(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)
    path, fs = storage.ray_storage(storage.join(store.uri, "runs"))
    kind = pafs.S3FileSystem if store.uri.startswith("s3://") else pafs.GcsFileSystem
    assert path == f"{store.server.bucket}/{store.prefix}/runs" and isinstance(fs, kind)


@pytest.mark.integration
def test_a_ray_train_checkpoint_lands_in_the_bucket_and_loads_back(store, ray_session, tmp_path, monkeypatch):
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop():
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            Path(d, "weights.txt").write_text("trained")
            Path(d, "state", "tag").mkdir(parents=True)  # DeepSpeed's layout: a folder per tag
            Path(d, "state", "tag", "optim.pt").write_text("moments")
            ray.train.report({"step": 1}, checkpoint=Checkpoint.from_directory(d))

    storage_path, storage_filesystem = storage.ray_storage(storage.join(store.uri, "runs"))
    result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                          run_config=RunConfig(name="tiny", storage_path=storage_path,
                                               storage_filesystem=storage_filesystem)).fit()
    assert result.checkpoint.path.startswith(f"{storage_path}/tiny/")
    assert any(k.startswith("runs/tiny/") and k.endswith("/weights.txt") for k in store.keys())
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    scheme = store.uri.split("://")[0]
    local = storage.local_copy(f"{scheme}://{result.checkpoint.path}")  # what from_pretrained would be handed
    assert (local / "weights.txt").read_text() == "trained"
    assert (local / "state/tag/optim.pt").read_text() == "moments"
    with checkpoint_directory(result.checkpoint) as d:  # what a resumed stage reads
        assert (d / "weights.txt").read_text() == "trained" and (d / "state/tag/optim.pt").read_text() == "moments"


# --- the grid-world job on s3:// and gs:// ----------------------------------------------------------------------

JOB = ["examples=20", "rows_per_shard=8", "tasks={maze: {sizes: [3]}, frozenlake: {sizes: [4]}}", "image_size=32"]


def run_job(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmreason.cli", "data", "gridworld", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_gridworld_job_writes_to_a_bucket_and_reads_back_with_and_without_ray(store, ray_session, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = storage.join(store.uri, "data")
    done = run_job(f"output_dir={root}/", *JOB, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert f"40 rows in {root}/" in done.stdout
    manifest = read_manifest(root)
    assert manifest["complete"] and manifest["total_rows"] == 40 and manifest["errors"] == []
    keys = [k for k in store.keys() if k != "data/"]  # the folder marker the write probe leaves, as mkdir would
    assert "data/manifest.json" in keys and all(k == "data/manifest.json" or k.endswith(".parquet") for k in keys)
    assert sorted(f"data/{e['path']}" for e in manifest["shards"]) == [k for k in keys if k.endswith(".parquet")]
    assert all(p.startswith(f"{root}/") for p in shard_paths(root))

    table = read_table(root)
    assert table.num_rows == 40 and len(set(table.column("id").to_pylist())) == 40
    assert read_table(root, split="train", task="maze").num_rows == 16
    ds = ray_dataset(root, split="train", task="frozenlake")
    assert ds.count() == 16 and ds.take(1)[0]["task"] == "frozenlake"

    again = run_job(f"output_dir={root}", *JOB, cwd=cwd)  # every shard is there: nothing rendered
    assert again.returncode == 0 and "(0 rendered" in again.stdout, again.stderr
    assert sorted(cwd.rglob("*")) == []  # nothing landed in the working directory (no ./s3:/… or ./gs:/…)


@pytest.mark.integration
def test_gridworld_job_on_a_missing_bucket_or_bad_uri_exits_2_naming_it(s3, tmp_path):
    done = run_job("output_dir=s3://no-such-bucket-here/data", *JOB, cwd=tmp_path)
    assert done.returncode == 2 and "output dir s3://no-such-bucket-here/data is not writable" in done.stderr
    done = run_job("output_dir=s3:/mmreason-test/data", *JOB, cwd=tmp_path)
    assert done.returncode == 2 and "output_dir: 's3:/mmreason-test/data' is not a supported location" in done.stderr
    assert "Traceback" not in done.stderr and sorted(tmp_path.rglob("*")) == []


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the job and the local Ray it started (its whole session)."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass
    proc.wait(timeout=30)


@pytest.mark.integration
def test_job_killed_mid_write_to_s3_leaves_only_whole_shards_and_the_rerun_completes(s3, tmp_path):
    root = storage.join(s3.uri, "data")
    args = [f"output_dir={root}", "examples=300", "rows_per_shard=15", "tasks={maze: {sizes: [3, 4]}}"]
    proc = subprocess.Popen([sys.executable, "-m", "mmreason.cli", "data", "gridworld", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if read_manifest(root)["total_rows"] >= 60:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed; give it more work"
    finally:
        kill_session(proc)

    partial = read_manifest(root)
    assert 0 < partial["total_rows"] < 600 and not partial["complete"]
    for entry in partial["shards"]:  # every shard the manifest names is whole
        assert read_shard_info(storage.join(root, entry["path"]))["rows"] == entry["rows"]
    for rel in storage.list_files(root):  # and so is every object there: no half shard, no temp file
        assert rel == "manifest.json" or read_shard_info(storage.join(root, rel))["rows"] == 15

    done = run_job(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(root)
    assert manifest["complete"] and 0 < manifest["last_run"]["rendered_rows"] < 600
    ids = read_table(root, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 600
    assert sorted(tmp_path.rglob("*")) == []


@pytest.mark.integration
def test_cinepile_job_reads_its_source_from_s3_and_writes_clips_there(s3, ray_session, tmp_path, monkeypatch):
    """Source, shards and clip shards on s3://: the job copies the source to its cache, keeps videos in
    the cache (never under the working directory), and ClipCache / load_cinepile read the frames back."""
    from mmreason.data.cinepile import ClipCache, load_cinepile
    from mmreason.data.download import clip_id_for_url
    from mmreason.data.video import write_synthetic_clip
    from tests.media import ClipServer, cinepile_rows

    clips = {f"c{i}.mp4": write_synthetic_clip(tmp_path / f"c{i}.mp4", 2, fps=10, size=(160, 90), seed=i).read_bytes()
             for i in range(2)}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    with ClipServer(clips) as server:
        questions = {server.url("c0.mp4"): 2, server.url("c1.mp4"): 1}
        source = storage.join(s3.uri, "src", "cinepile_test.json")
        storage.write_text_atomic(source, json.dumps(cinepile_rows(questions)))
        root = storage.join(s3.uri, "cinepile")
        done = subprocess.run(
            [sys.executable, "-m", "mmreason.cli", "data", "cinepile", f"source={source}", "split=test",
             f"output_dir={root}", "download.allowed_hosts=[127.0.0.1]", "download.sleep_s=0",
             "frames.num_frames=3", "frames.max_side=64"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(root)
    assert manifest["complete"] and manifest["total_rows"] == 3 and len(manifest["clip_shards"]) == 2
    assert sorted(cwd.rglob("*")) == []
    examples = load_cinepile(root, split="test")
    assert len(examples) == 3 and all(len(e.images) == 3 for e in examples)
    cache = ClipCache(root)
    assert len(cache.get(clip_id_for_url(server.url("c1.mp4")))["images"]) == 3
