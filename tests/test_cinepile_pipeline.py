"""The CinePile job for real: generated mp4 clips served from a loopback HTTP server, fetched by
yt-dlp, decoded, sampled and written to Parquet through Ray Data. Every failure kind ends in the
manifest with its reason while every good clip is written; re-runs skip finished clips (no request
at all) and retry the rest; a SIGKILLed job re-run ends with every row exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mmreason.cli import main as cli_main
from mmreason.config import load_config
from mmreason.data import read_table
from mmreason.data.cinepile import CinepileConfig, load_cinepile, read_clips
from mmreason.data.download import clip_id_for_url
from mmreason.data.shards import read_manifest
from mmreason.data.video import write_synthetic_clip
from pipelines import cinepile
from tests.media import ClipServer, cinepile_rows, truncated, write_json_rows
from tests.test_storage import kill_session

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
MAX_FILESIZE = 200_000


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    """Six good 3 s clips, one too large for MAX_FILESIZE, and a truncated copy of a good one."""
    d = tmp_path_factory.mktemp("media")
    files = {f"good{i}.mp4": write_synthetic_clip(d / f"good{i}.mp4", 3, fps=10, size=(160, 90), scenes=1 + i % 2,
                                                  gop_s=1.0, seed=i).read_bytes() for i in range(6)}
    files["big.mp4"] = write_synthetic_clip(d / "big.mp4", 20, fps=24, size=(640, 360), preset="ultrafast").read_bytes()
    assert len(files["big.mp4"]) > MAX_FILESIZE > max(len(files[f"good{i}.mp4"]) for i in range(6))
    files["truncated.mp4"] = truncated(files["good0.mp4"])
    return files


def job_args(source: Path, out: Path, host: str, *extra: str) -> list[str]:
    return [f"source={source}", "split=test", f"output_dir={out}", f"download.allowed_hosts=[{host}]",
            "download.sleep_s=0", "download.backoff_s=0.01", "download.retries=1",
            f"download.max_filesize={MAX_FILESIZE}", "frames.num_frames=4", "frames.max_side=128", *extra]


def test_every_failure_is_recorded_and_every_good_clip_written(media, tmp_path, ray_session):
    with ClipServer({k: v for k, v in media.items() if k != "good5.mp4"}) as server:
        questions = {server.url("good0.mp4"): 3, server.url("good1.mp4"): 2, server.url("good2.mp4"): 2,
                     server.url("missing.mp4"): 2, server.url("truncated.mp4"): 1, server.url("big.mp4"): 1,
                     server.url("ratelimited.mp4"): 1, "file:///etc/hostname": 1,
                     "https://evil.example.com/clip.mp4": 1, server.url("good5.mp4"): 2}
        source = write_json_rows(tmp_path / "cinepile_test.json", cinepile_rows(questions))
        out = tmp_path / "cinepile"
        cfg = load_config(CinepileConfig, None, job_args(source, out, "127.0.0.1"))
        manifest = cinepile.run(cfg, log=lambda *_: None)

        status = {url: manifest["clips"][clip_id_for_url(url)]["status"] for url in questions}
        assert status == {
            server.url("good0.mp4"): "ok", server.url("good1.mp4"): "ok", server.url("good2.mp4"): "ok",
            server.url("missing.mp4"): "unavailable", server.url("truncated.mp4"): "corrupt",
            server.url("big.mp4"): "too-large", server.url("ratelimited.mp4"): "rate-limited",
            "file:///etc/hostname": "invalid-url", "https://evil.example.com/clip.mp4": "invalid-url",
            server.url("good5.mp4"): "unavailable",
        }
        reasons = {url: manifest["clips"][clip_id_for_url(url)]["reason"] for url in questions}
        assert "404" in reasons[server.url("missing.mp4")]
        assert "max-filesize" in reasons[server.url("big.mp4")]
        assert "429" in reasons[server.url("ratelimited.mp4")]
        assert "scheme 'file'" in reasons["file:///etc/hostname"]
        assert "evil.example.com" in reasons["https://evil.example.com/clip.mp4"]
        assert str(out / "videos") in reasons[server.url("truncated.mp4")]
        assert manifest["clips"][clip_id_for_url(server.url("ratelimited.mp4"))]["attempts"] == 2  # retries=1
        assert {e["id"] for e in manifest["errors"]} == {clip_id_for_url(u) for u, s in status.items() if s != "ok"}
        assert not manifest["complete"]
        cov = manifest["coverage"]
        assert (cov["ok"], cov["unavailable"], cov["corrupt"], cov["too-large"], cov["rate-limited"],
                cov["invalid-url"], cov["questions_written"]) == (3, 2, 1, 1, 1, 2, 7)
        # no request ever left for a refused URL; the server saw only its own paths
        assert all(path.startswith("/") and "etc" not in path for _, path in server.requests)

        # every question of every good clip, once, with its clip's frames stored once
        table = read_table(out, task="cinepile")
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 7 and table.column("images").to_pylist() == [[]] * 7
        examples = load_cinepile(out, split="test")
        assert len(examples) == 7
        for ex in examples:
            assert len(ex.images) == 4 and ex.prompt.count("<image>") == 4 and "<video>" not in ex.prompt
            assert ex.images[0].size == (128, 72) and len(ex.meta["frame_times"]) == 4
            assert ex.meta["frame_times"] == sorted(ex.meta["frame_times"]) and ex.meta["frame_times"][-1] < 3.0
            assert ex.answer == "ABCDE"[ex.meta["answer_key_position"]]
        assert len(read_clips(out)) == 3 and len(list((out / "clips").glob("*.parquet"))) == 3
        storage = manifest["frame_storage"]
        assert storage["if_copied_per_question"] > 2 * storage["clip_shard_bytes"] > 0
        assert not [p for p in (out / "videos").iterdir() if p.suffix == ".mp4"]  # deleted once written
        # yt-dlp's archive lists the finished downloads, the one that then failed to decode too
        assert sorted((out / "download-archive.txt").read_text().split()[1::2]) == ["good0", "good1", "good2",
                                                                                    "truncated"]

        # a re-run makes no request for finished clips and retries every failure
        before = server.gets()
        server.files["good5.mp4"] = media["good5.mp4"]  # the clip came back
        again = cinepile.run(cfg, log=lambda *_: None)
        after = server.gets()
        for name in ("good0.mp4", "good1.mp4", "good2.mp4"):
            assert after[name] == before[name]
        for name in ("missing.mp4", "truncated.mp4", "big.mp4", "ratelimited.mp4"):
            assert after[name] > before[name]
        assert again["last_run"]["clips_tried"] == 7 and again["last_run"]["clips_ok"] == 1
        assert again["coverage"]["ok"] == 4 and again["coverage"]["questions_written"] == 9
        assert read_table(out, task="cinepile").num_rows == 9


def test_cli_reports_bad_input_naming_it(tmp_path, capsys):
    assert cli_main(["data", "cinepile", f"source={tmp_path / 'none.json'}"]) == 2
    assert f"CinePile source {tmp_path / 'none.json'} does not exist" in capsys.readouterr().err
    (tmp_path / "cinepile_test.json").write_text(json.dumps([{"question": "q?"}]))
    assert cli_main(["data", "cinepile", f"source={tmp_path / 'cinepile_test.json'}"]) == 2
    assert "lacks the columns ['movie_name'" in capsys.readouterr().err
    assert cli_main(["data", "cinepile", "frames.mode=psychic"]) == 2
    assert "frames.mode' must be one of ['uniform', 'fps', 'scene']" in capsys.readouterr().err


def test_sigkill_mid_run_then_rerun_gives_every_row_once(media, tmp_path, ray_session):
    with ClipServer(media) as server:
        names = [f"good{i}.mp4" for i in range(6)]
        source = write_json_rows(tmp_path / "cinepile_test.json",
                                 cinepile_rows({server.url(n): 3 for n in names}))
        out = tmp_path / "cinepile"
        args = job_args(source, out, "127.0.0.1", "download.concurrency=1")
        slow = [a for a in args if not a.startswith("download.sleep_s")] + ["download.sleep_s=0.4"]
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cinepile", *slow], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        manifest_path = out / "manifest.json"
        deadline = time.time() + 180
        try:
            while time.time() < deadline and proc.poll() is None:
                if manifest_path.exists() and json.loads(manifest_path.read_text())["coverage"]["ok"] >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the job finished before it could be killed; give it more work"
        finally:
            kill_session(proc)  # SIGKILL the driver and the local Ray it started
        partial = read_manifest(out)
        done_before = [cid for cid, c in partial["clips"].items() if c["status"] == "ok"]
        assert 2 <= len(done_before) < 6 and not partial["complete"]
        gets_at_kill = server.gets()

        manifest = cinepile.run(load_config(CinepileConfig, None, args), log=lambda *_: None)
        assert manifest["complete"] and manifest["coverage"]["ok"] == 6
        gets = server.gets()
        for name in names:
            if clip_id_for_url(server.url(name)) in done_before:
                assert gets[name] == gets_at_kill[name]  # finished clips: not requested again
        # a clip whose shards landed after the driver last wrote the manifest is skipped too
        assert manifest["last_run"]["clips_tried"] <= 6 - len(done_before)
        ids = read_table(out, columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 18
        assert Counter(json.loads(m)["clip_id"] for m in read_table(out, columns=["meta"]).column("meta")
                       .to_pylist()) == {clip_id_for_url(server.url(n)): 3 for n in names}
        assert not list(out.rglob(".*tmp-*"))
