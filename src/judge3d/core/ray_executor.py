"""The Ray executor: a stage's model work (generation batches, judge batches) spread over model
replicas, one per GPU, through Ray Data; results come back in input order.

Chosen outside the params, because it changes speed and never results (like ``JUDGE3D_WORKERS``):

- ``JUDGE3D_EXECUTOR``: ``local`` (default: everything in the stage's own process) or ``ray``;
- ``RAY_ADDRESS``: the cluster to join (Ray's own variable); unset, a local Ray is started;
- ``JUDGE3D_RAY_ACTORS``: model replicas (default: one per GPU of the cluster, else one per
  ``JUDGE3D_RAY_CPUS`` CPUs);
- ``JUDGE3D_RAY_GPUS`` / ``JUDGE3D_RAY_CPUS``: what one replica holds (default 1 GPU where the cluster
  has GPUs, else 0; 1 CPU);
- ``JUDGE3D_RAY_RETRIES``: how often a dead replica is restarted and its work item re-run (default 3).

How results stay byte-identical to the in-process path: a work item is exactly the batch the local
path would run (same members, same order), each replica loads the same weights and runs the same
function on it, the workers get the stage's pinned CPU numerics (:mod:`judge3d.core.numerics`) before
torch loads, and the driver consumes results in input order (``preserve_order``) and writes every
log row and manifest row itself. Callers drop finished work (answered queries, generated candidates)
before they hand items here, so nothing already done is shipped.

What Ray brings and this module does not reimplement: the actor pool and its scheduling
(``Dataset.map`` with a callable class and ``concurrency``), backpressure, and retries of a worker
that dies (``max_restarts`` / ``max_task_retries``). An exception raised by the work itself is not
retried (the same input would fail again); it fails the stage with the work item named.

Files: replicas read their inputs (model folders, images, meshes) and, for generation, write their
meshes at the same paths as the driver, so on a multi-node cluster the repository must be on a
filesystem every node mounts at the same path.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

EXECUTOR_ENV = "JUDGE3D_EXECUTOR"
EXECUTORS = ("local", "ray")
ACTORS_ENV, GPUS_ENV, CPUS_ENV, RETRIES_ENV = ("JUDGE3D_RAY_ACTORS", "JUDGE3D_RAY_GPUS", "JUDGE3D_RAY_CPUS",
                                               "JUDGE3D_RAY_RETRIES")


class RayExecutorError(RuntimeError):
    """A Ray run failed; the message names the work item and what to do."""


def executor_name() -> str:
    """``$JUDGE3D_EXECUTOR``: 'local' (default) or 'ray'."""
    name = os.environ.get(EXECUTOR_ENV, "").strip().lower() or "local"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; use one of {EXECUTORS} (unset = local)")
    return name


def use_ray() -> bool:
    return executor_name() == "ray"


def _env_number(name: str, kind: type, minimum: float) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw}: must be >= {minimum}")
    return value


@dataclass(frozen=True)
class RayResources:
    """What the replicas of one stage hold (see the module docstring for the variables)."""
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    retries: int

    @classmethod
    def from_env(cls, cluster: dict[str, float]) -> "RayResources":
        """Resources from the ``JUDGE3D_RAY_*`` variables, defaults from the cluster's totals."""
        cpus = _env_number(CPUS_ENV, float, 0)
        cpus = 1.0 if cpus is None else cpus
        gpus = _env_number(GPUS_ENV, float, 0)
        cluster_gpus = float(cluster.get("GPU", 0))
        gpus = (1.0 if cluster_gpus >= 1 else 0.0) if gpus is None else gpus
        actors = _env_number(ACTORS_ENV, int, 1)
        if actors is None:
            if gpus > 0:
                actors = max(1, int(cluster_gpus // gpus))
            else:
                actors = max(1, int(float(cluster.get("CPU", 1)) // max(cpus, 1.0)))
        retries = _env_number(RETRIES_ENV, int, 0)
        retries = 3 if retries is None else retries
        if gpus > 0 and actors * gpus > cluster_gpus + 1e-9:
            raise RayExecutorError(f"{actors} replicas x {gpus} GPU need {actors * gpus:g} GPUs, the Ray cluster has "
                                   f"{cluster_gpus:g}; lower {ACTORS_ENV} or {GPUS_ENV}")
        return cls(actors=actors, gpus_per_actor=gpus, cpus_per_actor=cpus, retries=retries)


def worker_env() -> dict[str, str]:
    """Environment of every replica process: this checkout's code first on the path, and this
    process's CPU-numerics settings (the stage pinned them before importing torch, see
    :mod:`judge3d.core.numerics`; a worker gets them before it imports torch). Variables this process
    does not set are passed as empty, so Ray's own defaults (it sets ``OMP_NUM_THREADS`` to the
    actor's CPUs) cannot make a replica compute differently from this process."""
    from judge3d.core.numerics import NATIVE_SWITCH, PINNED_CPU_ENV

    src = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                   if p and p != src])}
    env.update({k: os.environ.get(k, "") for k in (*PINNED_CPU_ENV, NATIVE_SWITCH)})
    return env


def _connect() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS, when set, is read by ray.init itself; unset, a local Ray starts in this process.
        ray.init(runtime_env={"env_vars": worker_env()}, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


class _Replica:
    """A Ray Data actor: builds one model replica with ``make()`` and runs it on one work item a call.

    ``make`` is a picklable zero-argument callable (a dataclass of paths and settings) returning a
    function of one work item. The item and its result travel pickled in the row, so any Python
    object (tensors, dataclasses) goes through unchanged."""

    def __init__(self, make: Callable[[], Callable[[Any], Any]]):
        self.run = make()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        item = pickle.loads(row["payload"])
        try:
            result = self.run(item)
        except Exception as exc:
            # Returned, not raised: Ray Data would abort the whole run at once, and the items before
            # this one that are finished but not yet handed to the driver would be lost. The driver
            # raises it when this item's turn comes, after writing every earlier result.
            return {"index": row["index"], "error": f"work item {row['label']}: {type(exc).__name__}: {exc}",
                    "payload": b""}
        return {"index": row["index"], "error": "",
                "payload": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)}


def ordered_map(make: Callable[[], Callable[[Any], Any]], items: Sequence[Any], labels: Sequence[str],
                what: str) -> Iterator[Any]:
    """``map(make(), items)`` over Ray replicas, yielding results in input order as they are ready.

    ``labels`` name the items in errors (e.g. the first candidate of a batch). ``what`` names the
    replicas in messages ('generator models/base', 'judge models/judges/eval'). Nothing is started
    for an empty ``items``."""
    if len(items) != len(labels):
        raise ValueError(f"ordered_map: {len(items)} items but {len(labels)} labels")
    if not items:
        return
    import ray
    from ray.data import DataContext

    _connect()
    resources = RayResources.from_env(ray.cluster_resources())
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order
    context.enable_progress_bars = False  # the stage's own tqdm bar counts the results
    # An item whose replica died more often than allowed is dropped from the output instead of
    # aborting the run, so the items before it still reach this process and are written; the driver
    # then stops at the gap and names the item.
    context.max_errored_blocks = len(items)
    rows = [{"index": i, "label": str(label), "payload": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)}
            for i, (item, label) in enumerate(zip(items, labels))]
    n_actors = min(resources.actors, len(rows))
    with warnings.catch_warnings():
        # Ray 2.60 marks **ray_remote_args deprecated, yet it is still the only way to bound an actor
        # pool's restarts (Ray Data's default restarts a replica forever, which would loop on an item
        # that kills its worker every time).
        warnings.simplefilter("ignore", DeprecationWarning)
        # One block per item, and one item in flight per replica: a dead worker costs only the item it
        # was running. With more in flight, Ray Data also failed the item queued on the same replica
        # before the one that killed it (seen under load), so the gap named the wrong item.
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _Replica, fn_constructor_args=(make,),
            compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
            num_gpus=resources.gpus_per_actor or None, num_cpus=resources.cpus_per_actor,
            max_restarts=resources.retries, max_task_retries=resources.retries)
    print(f"ray: {len(rows)} work items over {n_actors} replicas of {what} "
          f"({resources.gpus_per_actor:g} GPU, {resources.cpus_per_actor:g} CPU each)", flush=True)
    expected = 0
    try:
        for row in dataset.iter_rows():
            if row["index"] != expected:  # preserve_order: only a dropped item leaves a gap
                raise RayExecutorError(_died(what, labels[expected], expected, len(items), resources.retries))
            if row["error"]:
                raise RayExecutorError(f"{what}: {row['error']}. The {expected} work items before it are done and "
                                       "kept; fix the input and rerun the stage to resume.")
            expected += 1
            yield pickle.loads(row["payload"])
    except RayExecutorError:
        raise
    except Exception as exc:
        pending = labels[expected] if expected < len(labels) else "(none)"
        raise RayExecutorError(
            f"{what}: the Ray run failed after {expected} of {len(items)} work items ({type(exc).__name__}: "
            f"{str(exc)[:500]}). The first unfinished item is {pending}. A replica that dies is restarted "
            f"{resources.retries} times ({RETRIES_ENV}); rerun the stage to resume: finished work is kept.") from exc
    if expected != len(items):
        raise RayExecutorError(_died(what, labels[expected], expected, len(items), resources.retries))


def _died(what: str, label: str, done: int, total: int, retries: int) -> str:
    return (f"{what}: work item {label} did not finish: its replica died {retries + 1} time(s) "
            f"(restarts allowed: {retries}, {RETRIES_ENV}); the {done} of {total} work items before it are "
            "done and kept. Rerun the stage to resume; if the item kills its worker every time (out of "
            "memory?), the Ray worker logs (/tmp/ray/session_latest/logs) say why.")
