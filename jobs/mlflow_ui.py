"""The MLflow UI on this machine, against the local store (or the one MLFLOW_TRACKING_URI names).

    mmreason mlflow [--port 5000] [--host 127.0.0.1]

Serves `./mlflow.db` on http://127.0.0.1:5000 until Ctrl-C (one worker, its own process group,
stopped as a whole). When MLFLOW_TRACKING_URI is a server, there is nothing to start: it prints
the server's address. What to look at: README, "Reviewing runs in MLflow".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Sequence

from mmreason.cli_args import job_main
from mmreason.tracking import check_tracking_uri, tracking_uri, ui_command


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmreason mlflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    args = parser.parse_args(argv)
    uri = check_tracking_uri(tracking_uri())
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI is a server: open {uri} in a browser")
        return 0
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(ui_command(uri, args.host, args.port), start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
