"""Argument handling shared by every job entry point: `[ARG ...] [CONFIG.yaml] [key=value ...] [--flag ...]
[-v]`, and one place that turns errors into a one-line message (plus the job's log file): exit code 2
for the errors a user can cause, 1 for any other."""

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
    verbose: bool = False
    """`-v` / `--verbose`: Ray's, the workers' and the libraries' output on the terminal too, not only in the log."""


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
    parser.add_argument("-v", "--verbose", dest="_verbose", action="store_true",
                        help="show Ray's, the workers' and the libraries' full output here, not only in the log file")
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
                   check=bool(getattr(ns, "_check", False)), verbose=ns._verbose)


def print_check(report: dict[str, Any], out: Any = None) -> None:
    """What `--check` prints: the resolved config, then the resources and anything else the job
    worked out, as YAML; the last line says nothing was started."""
    import yaml

    out = out or sys.stdout
    print(yaml.safe_dump(report, sort_keys=False, default_flow_style=None, width=110), file=out, end="")
    print("check: config and inputs are valid; nothing was started", file=out)


def job_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv)`: a user error prints `error: …` and exits 2; any other error, once the job's
    console session (`mmreason.console`) has started and unless it is verbose, prints `error: TYPE:
    first line` and exits 1. Both name the log file, which holds the traceback. Errors before the
    session (or in a verbose one) other than user errors keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        from mmreason import console

        before = console.last_log()
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            print(f"error: {exc}{_log_hint(before)}", file=sys.stderr)
            return 2
        except Exception as exc:
            log = console.last_log()
            if log is None or log is before or console.was_verbose():
                raise
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"error: {type(exc).__name__}: {lines[0] if lines else ''}{_log_hint(before)}", file=sys.stderr)
            return 1

    return wrapper


def _log_hint(before: Any) -> str:
    """` (log: PATH)` when this job's console session wrote a log file, else nothing."""
    from mmreason import console

    log = console.last_log()
    return f"\n  log (traceback, Ray and worker output): {log}" if log is not None and log is not before else ""
