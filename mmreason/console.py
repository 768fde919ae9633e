"""What a job shows on the terminal: its steps, a progress bar per step and its results; everything
else (Ray's, Ray Data's and the training workers' output, DeepSpeed, MLflow, transformers, warnings)
goes to a log file under the run directory, whose path is printed once at the start.

    with console.session(run_dir, "train", verbose=args.verbose, steps=1):
        with console.step("train: cot") as step:
            bar = console.progress(epochs, "epoch")
            bar.update(1, loss=0.52)
            step.done("accuracy 0.41")
        console.echo(results_table)

How the rest is kept off the terminal: for the session, file descriptors 1 and 2 of this process are
pointed at the log file (`os.dup2`), and the console keeps a duplicate of the terminal for itself.
That catches everything the driver process writes, C-level writes and child processes included, and,
because jobs keep Ray's `log_to_driver` on, the workers' stdout and stderr too: Ray streams them to
the driver, which writes them to its (redirected) stdout. `verbose` leaves the descriptors alone, so
the full stream shows as before. Where stdout is not this process's descriptor 1 (pytest's capture,
say) nothing is redirected and the console writes to whatever `sys.stdout` is.

A bar redraws one line on a TTY; elsewhere (CI logs) it prints one line per update, at most
~`NON_TTY_LINES` per bar.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

LOG_DIR = "logs"
"""The folder under a job's run directory that holds its log files."""
NON_TTY_LINES = 20
"""At most about this many lines per progress bar when the terminal is not a TTY."""


@dataclass
class _Session:
    terminal: IO[str]
    log_path: Path
    verbose: bool
    redirected: bool
    steps: int
    step: int = 0


_session: _Session | None = None
_last_log: Path | None = None
_last_verbose = False


FALLBACK_DIR = Path(tempfile.gettempdir()) / "mmreason-logs"
"""Where logs go when the run directory is a bucket URI or cannot be written (a bad setting the job
is about to report)."""


def log_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir/logs` for a local run directory; FALLBACK_DIR for a bucket URI (logs are local files)
    or anything that is not a usable location (the job refuses it itself: no `./s3:/…` folder is made)."""
    from mmreason.config import ConfigError
    from mmreason.storage import check_location, is_remote

    try:
        where = check_location(str(run_dir), "run_dir")
    except ConfigError:
        return FALLBACK_DIR
    return FALLBACK_DIR if is_remote(where) else Path(where) / LOG_DIR


def _open_log(run_dir: str | os.PathLike, job: str) -> tuple[Path, IO[str]]:
    name = f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_dir(run_dir), FALLBACK_DIR):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder / name, open(folder / name, "a", buffering=1)
        except OSError:
            continue
    raise PermissionError(f"cannot write a log file under {log_dir(run_dir)} nor {FALLBACK_DIR}")


def _stdout_fd() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


@contextlib.contextmanager
def session(run_dir: str | os.PathLike, job: str, verbose: bool = False, steps: int = 1) -> Iterator[Path]:
    """One job's console: the log file `run_dir/logs/JOB-TIME-PID.log` (printed once), and, unless
    `verbose`, every other output of this process and its Ray workers redirected into it. An
    exception's traceback is written to the log before it propagates (`cli_args.job_main` turns it
    into one line). Yields the log path."""
    global _session, _last_log, _last_verbose
    log_path, log = _open_log(run_dir, job)
    redirect = not verbose and _stdout_fd() == 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1) if redirect else sys.stdout
    saved = (os.dup(1), os.dup(2)) if redirect else None
    if redirect:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _session, _last_log, _last_verbose = _Session(terminal, log_path, verbose, redirect, steps), log_path, verbose
    echo(f"log: {log_path}" + ("" if verbose else "   (-v shows it all here)"))
    try:
        yield log_path
    except BaseException:
        sys.stderr.flush()
        log.write(traceback.format_exc())
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if saved:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()
        log.close()
        _session = None


def active() -> bool:
    """Whether a job's console session is open in this process."""
    return _session is not None


def quiet() -> bool:
    """Whether a session is open that keeps library output off the terminal (not verbose): jobs then
    switch off what only makes sense on a terminal, such as Ray Data's progress bars."""
    return _session is not None and not _session.verbose


def redirected() -> bool:
    """Whether a session is open that points this process's stdout and stderr at its log file."""
    return _session is not None and _session.redirected


def last_log() -> Path | None:
    """The log file of the latest session in this process (for an error message after it closed)."""
    return _last_log


def was_verbose() -> bool:
    """Whether the latest session in this process was verbose (its errors keep their traceback)."""
    return _last_verbose


def echo(*parts: Any) -> None:
    """Print to the terminal (stdout outside a session); in a quiet session the log gets it too."""
    text = " ".join(str(p) for p in parts)
    if _session is None:
        print(text, flush=True)
        return
    print(text, file=_session.terminal, flush=True)
    if _session.terminal is not sys.stdout:
        print(text, flush=True)  # into the log, between the lines it explains


class Step:
    """One pipeline step: `[i/n] name` when it starts, `[i/n] name: done in Ns — SUMMARY` when it ends."""

    def __init__(self, name: str) -> None:
        self.name, self.summary, self.t0 = name, "", time.perf_counter()
        if _session is not None:
            _session.step += 1
            self.label = f"[{_session.step}/{max(_session.steps, _session.step)}] {name}"
        else:
            self.label = name
        echo(self.label)

    def done(self, summary: str) -> None:
        """What the end-of-step line reports (rows written, accuracy, …)."""
        self.summary = summary

    def close(self) -> None:
        tail = f" — {self.summary}" if self.summary else ""
        echo(f"{self.label}: done in {format_seconds(time.perf_counter() - self.t0)}{tail}")


@contextlib.contextmanager
def step(name: str) -> Iterator[Step]:
    """A pipeline step (see `Step`); an exception ends it without the done line."""
    s = Step(name)
    yield s
    s.close()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """A progress bar: `desc done/total [bar] key=value … ETA`. `update(n, **fields)` advances it by
    `n` and shows `fields` (loss, accuracy, …); `set(done, **fields)` puts it at `done`. The ETA is
    the mean time per unit since the bar started; `start` (a resumed run's units already done) does
    not count towards it."""

    WIDTH = 20

    def __init__(self, total: int, desc: str, start: int = 0) -> None:
        self.total, self.desc, self.done, self.start = max(int(total), 0), desc, start, start
        self.fields: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        out = _session.terminal if _session is not None else sys.stdout
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._printed_bucket = -1
        self._drawn = False

    def set(self, done: int, **fields: Any) -> None:
        self.done = min(done, self.total) if self.total else done
        self.fields.update(fields)
        self._draw()

    def update(self, n: int = 1, **fields: Any) -> None:
        self.set(self.done + n, **fields)

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.WIDTH))
        parts = [f"  {self.desc} {self.done}/{self.total} [{'#' * filled}{'.' * (self.WIDTH - filled)}]"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items() if v is not None]
        elapsed = time.perf_counter() - self.t0
        ran = self.done - self.start
        if 0 < ran and self.done < self.total:
            parts.append(f"ETA {format_seconds(elapsed / ran * (self.total - self.done))}")
        elif self.done >= self.total:
            parts.append(f"in {format_seconds(elapsed)}")
        return "  ".join(parts)

    def _draw(self) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
            self._drawn = True
            if self.done >= self.total:
                self.close()
            return
        bucket = self.done * NON_TTY_LINES // self.total if self.total else 0
        if bucket != self._printed_bucket or self.done >= self.total:
            self._printed_bucket = bucket
            print(text, file=self.out, flush=True)
        if self.out is not sys.stdout:
            print(text, flush=True)  # the log keeps every update

    def close(self) -> None:
        """End the bar's line (on a TTY)."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


def progress(total: int, desc: str, start: int = 0) -> Progress:
    return Progress(total, desc, start)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
