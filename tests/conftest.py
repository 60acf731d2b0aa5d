"""Shared test set-up: resumable work (judge answers, checkpoints) goes to each test's own folder,
never into the checkout's .judge3d/resume."""
from __future__ import annotations

import pytest

from judge3d.core.resume import ENV_VAR


@pytest.fixture(autouse=True)
def _private_resume_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "resume"))
