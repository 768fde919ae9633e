from __future__ import annotations

import pytest

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from pipelines import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
