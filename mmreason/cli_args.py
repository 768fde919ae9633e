"""Argument handling shared by every job entry point: `[ARG ...] [CONFIG.yaml] [key=value ...] [--flag ...]`,
and one place that turns the errors a user can cause into a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mmreason.config import ConfigError
from mmreason.data.shards import CorruptShardError, SourceError

USER_ERRORS = (ConfigError, CorruptShardError, SourceError, FileExistsError, FileNotFoundError, PermissionError)


@dataclass
class JobArgs:
    config: str | None
    overrides: list[str] = field(default_factory=list)
    positionals: dict[str, str] = field(default_factory=dict)
    check: bool = False
    """`--check`: validate the config and inputs, print the resolved config and resources, start nothing."""


def parse_job_args(
    prog: str, doc: str | None, argv: Sequence[str] | None, flags: Sequence[str] = (), positionals: Sequence[str] = (),
    check: bool = True,
) -> JobArgs:
    """Parse `[CONFIG] [key=value ...] [--check]`; each `--flag` in `flags` becomes the override `flag=true`.

    `positionals` names required arguments that come first (an input PATH, say); their values land
    in `JobArgs.positionals` by name.
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in positionals:
        parser.add_argument(name, metavar=name.upper())
    parser.add_argument("items", nargs="*", default=[], metavar="CONFIG|key=value",
                        help="a YAML config file (optional, first) and key.sub=value overrides")
    for flag in flags:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true")
    if check:
        parser.add_argument("--check", dest="_check", action="store_true",
                            help="validate the config and inputs, print the resolved config and the resources "
                                 "the job would ask for, and start nothing")
    ns = parser.parse_intermixed_args(argv)  # flags may sit anywhere, even between positionals
    config, overrides = None, []
    for i, item in enumerate(ns.items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            config = item
        else:
            parser.error(f"argument {item!r} is neither the first (config file) nor key=value")
    overrides += [f"{flag}=true" for flag in flags if getattr(ns, flag)]
    return JobArgs(config, overrides, {name: getattr(ns, name) for name in positionals},
                   check=bool(getattr(ns, "_check", False)))


def print_check(report: dict[str, Any], out: Any = None) -> None:
    """What `--check` prints: the resolved config, then the resources and anything else the job
    worked out, as YAML; the last line says nothing was started."""
    import yaml

    out = out or sys.stdout
    print(yaml.safe_dump(report, sort_keys=False, default_flow_style=None, width=110), file=out, end="")
    print("check: config and inputs are valid; nothing was started", file=out)


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
