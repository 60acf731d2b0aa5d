"""Shared test set-up: resumable work (judge answers, checkpoints) goes to each test's own folder,
never into the checkout's .judge3d/resume."""
from __future__ import annotations

import os

# Two test workers share the 2 cores, and each runs torch with 2 OpenMP threads (in process, in the
# pipelines' stages, in Ray replicas). libgomp's default lets an idle thread spin for 300,000 rounds
# after every parallel region, burning the core the other worker needs: two mini-generator trainings
# side by side ran at 0.16-0.30 it/s each, against 0.77-0.79 with passive waiting and 1.54 alone
# (benchmarks/omp_wait_policy.py). Waiting changes no result (same weights, bit for bit). Set before
# anything loads torch, and inherited by every stage, `dvc` and Ray process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from judge3d.core.resume import ENV_VAR  # noqa: E402


@pytest.fixture(autouse=True)
def _private_resume_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "resume"))


# The two end-to-end pipelines take most of the suite's time. `make test` hands out whole files in
# collection order (--dist loadfile --no-loadscope-reorder), so listing them first starts each on its own
# worker at once; the other files fill in around them. Left to xdist's default order (files with most
# tests first), a worker with one test pending takes the next file too, and the two ran one after the
# other on one worker (852 s instead of about 550 s on 2 cores).
PIPELINE_TESTS = ("tests/test_e2e.py", "tests/test_paper_smoke.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return PIPELINE_TESTS.index(path) if path in PIPELINE_TESTS else len(PIPELINE_TESTS)

    items.sort(key=rank)  # stable: the order within each file and among the others is kept
