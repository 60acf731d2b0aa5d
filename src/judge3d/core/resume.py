"""Work that survives a killed stage, kept outside DVC's outputs.

DVC deletes a stage's outputs before it runs the stage's command, on a plain rerun and with
``dvc repro -f``. A verdict log, partial manifest or checkpoint kept inside the outputs therefore
resumes nothing under ``dvc repro``: a killed stage would start from zero. So the work that is
expensive to redo lives here instead, under ``.judge3d/resume/`` in the repository (git- and
DVC-ignored; ``JUDGE3D_RESUME_DIR`` moves it):

- ``answers/``: judge answers, content-addressed. One file per batch of queries, named by the
  sha256 of the batch's query keys (each key already hashes pair id, order, judge id, prompt and
  both images), written atomically once the batch is answered. A rerun asks the model only for
  batches it has no file for, and because batches are cut the same way every run, every answer is
  bit-identical to an uninterrupted run's. The files of a run are removed when the run completes,
  so a later ``dvc repro -f`` really recomputes.
- ``checkpoints/<output folder>/<run fingerprint>/``: a training stage's checkpoint (model, optimizer,
  scheduler and RNG state, step, history; format and writer: :mod:`judge3d.core.training`), written
  atomically; removed once the model is saved.

Why not ``persist: true`` outputs: DVC then neither deletes nor restores them from the cache, so a
persisted output that holds a finished run's state is silently reused by a later run with other
inputs unless every stage checks it, and ``dvc checkout``/``pull`` cannot bring it back. A
content-addressed store needs no such care: a key that matches is, by construction, the same work.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

ENV_VAR = "JUDGE3D_RESUME_DIR"
DEFAULT_DIR = Path(".judge3d") / "resume"


def resume_root() -> Path:
    """Where resumable work lives: ``$JUDGE3D_RESUME_DIR``, else ``.judge3d/resume`` in the working
    directory (stages run from the repository root)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AnswerCache:
    """Judge answers of whole batches, keyed by the batch's query keys (see module docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.dir = Path(root) if root is not None else resume_root() / "answers"

    @staticmethod
    def batch_key(query_keys: Iterable[str]) -> str:
        return hashlib.sha256("\n".join(query_keys).encode()).hexdigest()

    def _path(self, batch_key: str) -> Path:
        return self.dir / batch_key[:2] / f"{batch_key}.json"

    def get(self, query_keys: list[str]) -> dict[str, float] | None:
        """The answers of this exact batch, or None. A damaged file counts as absent (re-asked)."""
        path = self._path(self.batch_key(query_keys))
        try:
            answers = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(answers, dict) or sorted(answers) != sorted(query_keys):
            return None
        return {k: float(v) for k, v in answers.items()}

    def put(self, answers: Mapping[str, float]) -> None:
        keys = list(answers)
        _atomic_write_text(self._path(self.batch_key(keys)), json.dumps({k: float(answers[k]) for k in keys}))

    def discard(self, batches: Iterable[list[str]]) -> None:
        for keys in batches:
            self._path(self.batch_key(keys)).unlink(missing_ok=True)


def fingerprint(*parts: object) -> str:
    """A stable hash of everything that determines a training run (settings, seed, input hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(out_dir: str | Path, run_fingerprint: str) -> Path:
    """The checkpoint folder of the training run that writes ``out_dir`` with these settings.

    Keyed by the run's fingerprint, so a checkpoint of other settings is never resumed (it would
    silently mix two runs); :func:`drop_checkpoints` clears every fingerprint of ``out_dir``."""
    return _checkpoints_of(out_dir) / run_fingerprint


def _checkpoints_of(out_dir: str | Path) -> Path:
    rel = Path(os.path.normpath(out_dir)).as_posix().strip("/").replace("/", "__")
    return resume_root() / "checkpoints" / rel


def drop_checkpoints(out_dir: str | Path) -> None:
    """Remove ``out_dir``'s checkpoints once its model is saved."""
    shutil.rmtree(_checkpoints_of(out_dir), ignore_errors=True)


def replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Swap a fully written ``tmp`` folder in for ``final``: write beside, then rename."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
