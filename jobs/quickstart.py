"""The embedded default, end to end on one machine with no set-up (README command 1).

    python -m jobs.quickstart [CONFIG.yaml] [key=value ...]
    mmreason quickstart [CONFIG.yaml] [key=value ...]

Today it renders the default grid-world dataset (all three tasks) with a local Ray; the training,
evaluation and MLflow stages join here as they land.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Sequence

from mmreason.cli_args import job_main, parse_job_args
from mmreason.config import load_config
from mmreason.data.gridworld import GridworldConfig
from pipelines import gridworld


def _default_data() -> GridworldConfig:
    return GridworldConfig(output_dir="runs/quickstart/data/gridworld")


@dataclass
class QuickstartConfig:
    data: GridworldConfig = field(default_factory=_default_data)
    """The grid-world dataset the quickstart renders."""


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_job_args("mmreason quickstart", __doc__, argv)
    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    manifest = gridworld.run(cfg.data)
    last = manifest["last_run"]
    print("\nquickstart: grid-world dataset")
    print(gridworld.summary_table(manifest))
    rate = f", {last['examples_per_s']} examples/s" if last["examples_per_s"] else ""
    print(f"{manifest['total_rows']} rows, {len(manifest['shards'])} shards in {cfg.data.output_dir} "
          f"(rendered {last['rendered_rows']} in {last['seconds']:.1f}s{rate})")
    print(f"read them with: python -c \"from mmreason.data import load_examples; "
          f"ex = load_examples('{cfg.data.output_dir}', split='test', task='maze')[0]; print(ex.prompt, ex.steps, ex.answer)\"")
    return 1 if manifest["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
