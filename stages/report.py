"""Stage `report`: the study and severity tables (md + csv), the calibration block, the Bradley–Terry
ranking (metrics/ranking.json + reports/ranking.md|csv), plot data for `dvc plots` and one static
reports/report.html, from metrics/ and the raw logs (cheap: no model)."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys

from judge3d.core.config import load_params
from judge3d.report.build import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    written = write_report(".", load_params())
    print("report: wrote " + ", ".join(p.as_posix() for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
