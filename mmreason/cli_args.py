"""Argument handling shared by every job entry point: `[CONFIG.yaml] [key=value ...] [--flag ...]`,
and one place that turns the errors a user can cause into a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mmreason.config import ConfigError
from mmreason.data.shards import CorruptShardError

USER_ERRORS = (ConfigError, CorruptShardError, FileExistsError, FileNotFoundError, PermissionError)


@dataclass
class JobArgs:
    config: str | None
    overrides: list[str] = field(default_factory=list)


def parse_job_args(prog: str, doc: str | None, argv: Sequence[str] | None, flags: Sequence[str] = ()) -> JobArgs:
    """Parse `[CONFIG] [key=value ...]`; each `--flag` in `flags` becomes the override `flag=true`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                        help="a YAML config file (optional, first) and key.sub=value overrides")
    for flag in flags:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true")
    ns = parser.parse_args(argv)
    config, overrides = None, []
    for i, item in enumerate(ns.items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            config = item
        else:
            parser.error(f"argument {item!r} is neither the first (config file) nor key=value")
    overrides += [f"{flag}=true" for flag in flags if getattr(ns, flag)]
    return JobArgs(config, overrides)


def job_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv)`: user errors print `error: …` and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
