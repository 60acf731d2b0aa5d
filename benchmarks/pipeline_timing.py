"""Wall time of `dvc repro`, per stage: runs the command given (default `dvc repro`), echoes its
output, and prints a table of the seconds between consecutive "Running stage" lines.

    python benchmarks/pipeline_timing.py                       # the whole graph
    python benchmarks/pipeline_timing.py dvc repro -f report   # any repro command
    python benchmarks/pipeline_timing.py --log repro.log       # also keep the raw output

Stages that DVC skips ("didn't change") cost their check time, which lands in the previous
running stage's row; the total is the command's wall time.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

RUNNING = re.compile(r"Running stage '([^']+)'")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default=None, help="write the command's raw output here too")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (default: dvc repro)")
    args = ap.parse_args()
    cmd = args.cmd or ["dvc", "repro"]
    log = open(args.log, "w") if args.log else None
    t0 = time.time()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if log:
            log.write(line)
        m = RUNNING.search(line)
        if m:
            marks.append((m.group(1), time.time()))
    rc = proc.wait()
    end = time.time()
    print(f"\n{'stage':40s} {'wall s':>8s}")
    for (name, start), nxt in zip(marks, [m[1] for m in marks[1:]] + [end]):
        print(f"{name:40s} {nxt - start:8.1f}")
    print(f"{'total (' + ' '.join(cmd) + ')':40s} {end - t0:8.1f}   exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
