"""The `mmreason` console script: one front door to the jobs in `pipelines/` and `jobs/`.

    mmreason quickstart [CONFIG] [key=value ...] [--check]
    mmreason data gridworld [CONFIG] [key=value ...] [--overwrite] [--check]
    mmreason data import-mvot PATH [CONFIG] [key=value ...] [--overwrite] [--check]
    mmreason data cinepile [CONFIG] [key=value ...] [--overwrite] [--check]
    mmreason data aokvqa [CONFIG] [key=value ...] [--overwrite] [--check]
    mmreason train CONFIG [key=value ...] [--check]
    mmreason infer cinepile [CONFIG] [key=value ...] [--check]
    mmreason evaluate [CONFIG] [press=NAME] [press.key=value ...] [--check]
    mmreason sweep CONFIG [key=value ...] [--check]
    mmreason mlflow [--port 5000]
    mmreason models build NAME OUT_DIR [--seed N]

`--check` validates the config and inputs, prints the resolved config and what the job would do
and ask for, and starts nothing.
"""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    ("quickstart",): "jobs.quickstart",
    ("data", "gridworld"): "pipelines.gridworld",
    ("data", "import-mvot"): "pipelines.mvot_import",
    ("data", "cinepile"): "pipelines.cinepile",
    ("data", "aokvqa"): "pipelines.aokvqa",
    ("train",): "jobs.train",
    ("infer", "cinepile"): "jobs.video_qa",
    ("evaluate",): "jobs.evaluate",
    ("sweep",): "jobs.sweep",
    ("mlflow",): "jobs.mlflow_ui",
    ("models", "build"): "jobs.build_model",
}
# Arguments a command takes before the usual [CONFIG] [key=value ...], for the usage text.
LEADING_ARGS = {("data", "import-mvot"): "PATH "}
USAGE = {("models", "build"): "mmreason models build NAME OUT_DIR [--seed N]",
         ("train",): "mmreason train CONFIG [key=value ...] [--check]",
         ("mlflow",): "mmreason mlflow [--port 5000] [--host 127.0.0.1]"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, module in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            import importlib

            return importlib.import_module(module).main(argv[len(words) :])
    usage = "\n".join(
        "  " + USAGE.get(w, f"mmreason {' '.join(w)} {LEADING_ARGS.get(w, '')}[CONFIG] [key=value ...] [--check]")
        for w in COMMANDS)
    stream = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
    print(f"usage:\n{usage}", file=stream)
    return 0 if stream is sys.stdout else 2


if __name__ == "__main__":
    sys.exit(main())
