"""The one training loop: every trainer in judge3d (pretrain-base, pretrain-judges, the arms) runs here.

The caller owns the model, the optimizer and a *step function*: ``step_fn(s)`` computes the loss of
optimizer step ``s`` from generators seeded by ``(seed, ..., s)`` (:func:`judge3d.core.seeding.derive_seed`)
and returns ``(loss, logs)``, or ``None`` to stop (a non-finite loss, say). This module does the rest,
the same way for everyone: backward, gradient clipping, the optimizer and LR-schedule steps, dvclive
logging, probes, and checkpoints that resume byte-identically.

Step convention
---------------
Optimizer steps are numbered ``s = 0, 1, ..., steps - 1``. Step ``s`` draws every random number from
the caller's per-step generators, updates the weights once with the learning rate ``schedule(s)``,
then advances the schedule. **Everything about step s is logged at dvclive step s**:

- ``train/<name>``: the step function's figures of step ``s``, plus ``train/lr`` (the learning rate
  step ``s`` used) and ``train/grad_norm`` (the norm before clipping, where clipping is on). With
  ``log_every = k > 1`` only the last step of each window of ``k`` steps is logged (``s = k-1, 2k-1,
  ...`` and the final step), with the window's mean of each figure.
- ``probe/<name>``: a probe run after step ``s`` (every ``N`` steps: after ``s = N-1, 2N-1, ...``;
  at the end: after the last step done).

A checkpoint *at step s* holds the state after ``s`` updates, so a resumed run continues with step
``s``. A resumed run first logs steps ``0 .. s-1`` again from the checkpoint's history (DVC deleted
the stage's dvclive folder before rerunning it), so its curves are the uninterrupted run's.

Checkpoints
-----------
One folder per run (:func:`judge3d.core.resume.checkpoint_dir`, keyed by the run's fingerprint),
written as a sibling ``<folder>.tmp`` and swapped in by renames
(:func:`judge3d.core.resume.replace_dir_atomically`), so a kill leaves the previous checkpoint or the
new one, never a half-written folder in use. It holds ``model.safetensors`` (each module's state,
keys prefixed ``<module>.``), ``optimizer.pt`` (optimizer and scheduler state), ``rng.pt`` (torch,
CUDA, numpy and Python global RNG states; both loaded with ``torch.load(weights_only=True)``) and,
written last, ``state.json`` (format, fingerprint, step, history, probe results). A folder whose
``state.json`` is missing, of another format or of another fingerprint is discarded.

Why not ``accelerate``'s ``save_state``/``load_state``: they need the model, optimizer and scheduler
wrapped by ``Accelerator.prepare`` (an ``AcceleratedScheduler`` steps the schedule on its own terms),
``save_state`` writes straight into its output folder (a kill mid-write leaves a half checkpoint
that ``load_state`` then reads), and it keeps neither the loss history nor a fingerprint. We would
still write the temp folder, the swap and ``state.json`` ourselves; what it would save us is a few
``torch.save`` calls.

Determinism: a run is a function of its inputs and per-step seeds; probes run under
``torch.no_grad()`` with the global torch RNG state restored after them, so a probe never changes
the training. Two runs, and a run killed after a checkpoint and resumed, give byte-identical weights.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from judge3d.core.resume import replace_dir_atomically

FORMAT = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"

StepFn = Callable[[int], "tuple[torch.Tensor, dict[str, float]] | None"]


# ---------------------------------------------------------------------------------------------
# LR schedules: transformers' helpers (LambdaLR), stepped once after every optimizer step
# ---------------------------------------------------------------------------------------------
def cosine_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 (step ``s < warmup_steps`` uses ``lr * s / warmup_steps``), then a half
    cosine from ``lr`` down to ``min_lr_ratio * lr`` at step ``total_steps``:
    ``transformers.get_cosine_with_min_lr_schedule_with_warmup``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                       num_training_steps=total_steps, min_lr_rate=min_lr_ratio)


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's own learning rate at every step: ``transformers.get_constant_schedule``."""
    from transformers import get_constant_schedule

    return get_constant_schedule(optimizer)


# ---------------------------------------------------------------------------------------------
# dvclive
# ---------------------------------------------------------------------------------------------
@contextmanager
def open_live(live_dir: str | Path) -> Iterator[Any]:
    """The dvclive run of a training stage. ``dvcyaml=False``: the plots are declared in dvc.yaml by
    hand. ``resume=False``: the folder starts empty; a resumed run logs its earlier steps again from
    the checkpoint (module docstring), so stale rows of another run are never kept."""
    from dvclive import Live

    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None, resume=False) as live:
        yield live


def _log(live: Any, step: int, prefix: str, values: Mapping[str, float]) -> None:
    if live is None or not values or step < 0:
        return
    live.step = step
    for name, value in values.items():
        live.log_metric(f"{prefix}/{name}", float(value))
    live.make_summary()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """``fn(s)`` -> figures, run after step ``s`` when ``(s + 1) % every == 0`` and/or after the last
    step done (``at_end``; ``s = -1`` when no step was done, not logged); logged as ``probe/<name>``
    at dvclive step ``s``."""
    fn: Callable[[int], Mapping[str, float]]
    every: int | None = None
    at_end: bool = True


@dataclass(frozen=True)
class Checkpointing:
    """Where (a :func:`judge3d.core.resume.checkpoint_dir` folder), for which run, and how often:
    after every ``every`` steps, never after the last one (the caller saves the model then)."""
    dir: Path
    fingerprint: str
    every: int


@dataclass
class LoopResult:
    start_step: int                       # 0, or the step a checkpoint resumed at
    steps_done: int                       # updates applied in all (== steps unless stopped)
    stopped_at: int | None                # the step whose step_fn returned None
    history: list[dict[str, float]] = field(default_factory=list)   # per step, from step 0
    probes: list[dict[str, float]] = field(default_factory=list)    # {"step": s, **figures}

    def last_probe(self) -> dict[str, float]:
        return self.probes[-1] if self.probes else {}


def train(step_fn: StepFn, *, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int, name: str,
          grad_clip: float | None = None, checkpoint: Checkpointing | None = None,
          trainable_only: bool = False, live: Any = None, log_every: int = 1,
          probes: Sequence[Probe] = (), progress: bool = True) -> LoopResult:
    """Run steps ``0 .. steps-1`` of ``step_fn`` (resuming from ``checkpoint`` when it holds this run).

    ``modules``: what a checkpoint saves and restores (``trainable_only``: only parameters that
    require grad, loaded non-strictly, e.g. LoRA on a frozen base). Gradients are clipped to
    ``grad_clip`` (total norm over the optimizer's parameters, in its order), if given.
    """
    if steps < 0 or log_every < 1:
        raise ValueError(f"steps must be >= 0 and log_every >= 1, got {steps}, {log_every}")
    if checkpoint is not None and checkpoint.every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint.every}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start, history, probe_log = 0, [], []
    if checkpoint is not None:
        resumed = load_checkpoint(checkpoint, modules, optimizer, scheduler, trainable_only)
        if resumed is not None:
            start, history, probe_log = resumed
            print(f"{name}: resuming training at step {start} from {checkpoint.dir}")
    for s in range(start):  # the curve of the steps done before the checkpoint
        if _window_ends(s, steps, log_every):
            _log(live, s, "train", _window_mean(history, s, log_every))
    for record in probe_log:
        _log(live, int(record["step"]), "probe", {k: v for k, v in record.items() if k != "step"})

    probes_run: set[tuple[int, int]] = set()

    def run_probes(s: int, end: bool) -> None:
        due = [i for i, p in enumerate(probes) if (i, s) not in probes_run
               and ((end and p.at_end) or (p.every and (s + 1) % p.every == 0))]
        if not due:
            return
        probes_run.update((i, s) for i in due)
        rng_state = torch.get_rng_state()
        with torch.no_grad():
            figures: dict[str, float] = {}
            for i in due:
                figures.update({k: float(v) for k, v in probes[i].fn(s).items()})
        torch.set_rng_state(rng_state)
        probe_log.append({"step": s, **figures})
        _log(live, s, "probe", figures)

    stopped_at = None
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not progress)
    for s in bar:
        out = step_fn(s)
        if out is None:
            stopped_at = s
            break
        loss, logs = out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs = dict(logs)
        if grad_clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        logs["lr"] = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        history.append(logs)
        if "loss" in logs:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if _window_ends(s, steps, log_every):
            _log(live, s, "train", _window_mean(history, s, log_every))
        is_last = s + 1 == steps
        if not is_last:
            run_probes(s, end=False)
        if checkpoint is not None and (s + 1) % checkpoint.every == 0 and not is_last:
            save_checkpoint(checkpoint, s + 1, modules, optimizer, scheduler, history, probe_log, trainable_only)
    bar.close()
    done = len(history)
    if stopped_at is not None and done and not _window_ends(done - 1, steps, log_every):
        _log(live, done - 1, "train", _window_mean(history, done - 1, log_every))  # the cut window
    run_probes(done - 1, end=True)
    return LoopResult(start_step=start, steps_done=done, stopped_at=stopped_at, history=history, probes=probe_log)


def _window_ends(s: int, steps: int, log_every: int) -> bool:
    return (s + 1) % log_every == 0 or s + 1 == steps


def _window_mean(history: list[dict[str, float]], s: int, log_every: int) -> dict[str, float]:
    window = history[s - s % log_every: s + 1]
    keys = list(dict.fromkeys(k for logs in window for k in logs))
    return {k: sum(h[k] for h in window if k in h) / sum(k in h for h in window) for k in keys}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _module_tensors(modules: Mapping[str, nn.Module], trainable_only: bool) -> dict[str, torch.Tensor]:
    out = {}
    for mname, module in modules.items():
        state = module.state_dict()
        if trainable_only:
            keep = {n for n, p in module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep}
        out.update({f"{mname}.{k}": v.detach().contiguous().cpu() for k, v in state.items()})
    return out


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt: Checkpointing, step: int, modules: Mapping[str, nn.Module], optimizer, scheduler,
                    history: list[dict[str, float]], probes: list[dict[str, float]] = (),
                    trainable_only: bool = False) -> None:
    """Write the state after ``step`` updates into ``<dir>.tmp``, then swap it in for ``<dir>``."""
    tmp = ckpt.dir.with_name(ckpt.dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_module_tensors(modules, trainable_only), str(tmp / MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    torch.save(_rng_state(), tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "fingerprint": ckpt.fingerprint, "step": step,
                                              "history": history, "probes": list(probes)}))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    replace_dir_atomically(tmp, ckpt.dir)
    _fsync(ckpt.dir.parent)


def _readable(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("fingerprint") != fingerprint:
        return None
    return state


def load_checkpoint(ckpt: Checkpointing, modules: Mapping[str, nn.Module], optimizer, scheduler,
                    trainable_only: bool = False) -> tuple[int, list[dict[str, float]], list[dict[str, float]]] | None:
    """Restore a checkpoint of this run; return ``(step, history, probes)``, or ``None`` (start at 0).

    A kill between the two renames of the swap leaves only ``<dir>.old`` (the previous checkpoint):
    it is moved back and used. A ``<dir>.tmp`` is never read. Anything unreadable, of another format
    or of another fingerprint is removed.
    """
    folder, old = ckpt.dir, ckpt.dir.with_name(ckpt.dir.name + ".old")
    state = _readable(folder, ckpt.fingerprint)
    if state is None and not folder.exists() and _readable(old, ckpt.fingerprint) is not None:
        old.rename(folder)
        state = _readable(folder, ckpt.fingerprint)
    if state is None:
        if folder.exists():
            print(f"discarding checkpoint {folder}: not one of this run")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    tensors = load_file(str(folder / MODEL_FILE))
    for mname, module in modules.items():
        prefix = f"{mname}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                               strict=not trainable_only)
    opt_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    _set_rng_state(torch.load(folder / RNG_FILE, weights_only=True))
    return int(state["step"]), list(state["history"]), list(state.get("probes", []))
