"""Manifests (JSON Lines) and small file helpers shared by every stage."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads back as "missing", never as a number
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(row: dict[str, Any]) -> str:
    return json.dumps(_jsonable(row), sort_keys=True, separators=(",", ":"))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a whole manifest atomically (temp file + rename), one sorted-key JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
        tmp = fh.name
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found: run the stage that makes it (dvc repro).")
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield rows; a truncated last line (a killed writer) is skipped, any other bad line raises."""
    path = Path(path)
    with path.open() as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and not line.endswith("\n"):
                return  # partial row from an interrupted append: it is redone on resume
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc}); delete the line or rerun the stage.") from exc
        if not isinstance(row, dict):  # every reader indexes rows by field name
            raise ValueError(f"{path}:{i + 1}: a manifest row must be a JSON object ({{...}}), got a "
                             f"{type(row).__name__}; delete the line or rerun the stage that wrote {path.name}.")
        yield row


class JsonlAppender:
    """Append rows one at a time, flushed and fsynced, so a kill loses at most the row in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = self.path.open("a")

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # drop a partial row left by a kill
            cut = data.rfind(b"\n") + 1
            self.path.write_bytes(data[:cut])

    def append(self, row: dict[str, Any]) -> None:
        self._fh.write(dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed float repr) so two runs give byte-identical metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(obj), sort_keys=True, indent=2) + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class ModelFileError(ValueError):
    """A saved model's file is damaged; the message names the file and how to remake it."""


def read_model_json(path: str | Path, fix: str) -> Any:
    """A model folder's JSON file (config.json, ...); a damaged one names itself and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc}): the model folder {path.parent} is damaged; {fix}") from exc


def check_safetensors(path: str | Path, fix: str) -> None:
    """Check a safetensors file's framing without loading it: the 8-byte header length, the JSON
    header, and that the file holds every tensor's bytes. safetensors itself reports a 0-byte or
    truncated file as 'invalid header length' with no path, so the checks run here first."""
    path = Path(path)
    size = path.stat().st_size
    where = f"{path} ({size} bytes; model folder {path.parent})"
    if size < 8:
        raise ModelFileError(f"{where} is empty or truncated, not a safetensors file; {fix}")
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if 8 + n > size:
            raise ModelFileError(f"{where} is truncated: its header alone needs {8 + n} bytes; {fix}")
        try:
            header = json.loads(fh.read(n))
            end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, IndexError, ValueError,
                AttributeError) as exc:
            raise ModelFileError(f"{where} has a corrupt header ({type(exc).__name__}: {exc}); {fix}") from exc
    if 8 + n + end > size:
        raise ModelFileError(f"{where} is truncated: its tensors need {8 + n + end} bytes; {fix}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
