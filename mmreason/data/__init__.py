"""The example schema, Parquet shard IO and readers, and the dataset builders behind `pipelines/`.

    from mmreason.data import load_examples
    test_mazes = load_examples("runs/data/gridworld", split="test", task="maze")
"""

from mmreason.data.reader import iter_examples, load_examples, ray_dataset, read_table, shard_paths
from mmreason.data.schema import EXAMPLE_SCHEMA, SCHEMA_VERSION, SPLITS, Example, decode_row, validate_row

__all__ = [
    "EXAMPLE_SCHEMA",
    "SCHEMA_VERSION",
    "SPLITS",
    "Example",
    "decode_row",
    "iter_examples",
    "load_examples",
    "ray_dataset",
    "read_table",
    "shard_paths",
    "validate_row",
]
