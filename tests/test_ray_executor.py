"""The Ray executor (judge3d.core.ray_executor) on a local Ray with 2 CPU replicas: generation and
judging give byte-identical outputs to the in-process path, a SIGKILLed replica is retried, a work
item that fails is named, and a rerun resumes to identical outputs.

Ray starts once for the module (a few seconds). The stage-level check (the real `generate` and
`judge-train-labels` stages under `dvc repro` with JUDGE3D_EXECUTOR=ray) is in tests/test_e2e.py.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra: `make test` installs it")

from judge3d.core.io import read_jsonl  # noqa: E402
from judge3d.core.ray_executor import (ACTORS_ENV, CPUS_ENV, EXECUTOR_ENV, GPUS_ENV, RETRIES_ENV,  # noqa: E402
                                       RayExecutorError, RayResources, executor_name)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs, as the executor starts it (pinned numerics and this src/ in its workers)."""
    from judge3d.core.ray_executor import worker_env

    saved = {k: os.environ.get(k) for k in (EXECUTOR_ENV, ACTORS_ENV, CPUS_ENV, GPUS_ENV, RETRIES_ENV)}
    os.environ.update({ACTORS_ENV: "2", CPUS_ENV: "1", GPUS_ENV: "0"})
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": worker_env()})
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_executor_and_resources_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    assert executor_name() == "local"
    monkeypatch.setenv(EXECUTOR_ENV, "Ray")
    assert executor_name() == "ray"
    monkeypatch.setenv(EXECUTOR_ENV, "dask")
    with pytest.raises(ValueError, match="JUDGE3D_EXECUTOR='dask'"):
        executor_name()
    for k in (ACTORS_ENV, CPUS_ENV, GPUS_ENV, RETRIES_ENV):
        monkeypatch.delenv(k, raising=False)
    assert RayResources.from_env({"CPU": 16.0, "GPU": 2.0}) == RayResources(2, 1.0, 1.0, 3)
    assert RayResources.from_env({"CPU": 4.0}) == RayResources(4, 0.0, 1.0, 3)
    monkeypatch.setenv(ACTORS_ENV, "3")
    with pytest.raises(RayExecutorError, match="need 3 GPUs, the Ray cluster has 2"):
        RayResources.from_env({"CPU": 16.0, "GPU": 2.0})
    monkeypatch.setenv(ACTORS_ENV, "two")
    with pytest.raises(ValueError, match="JUDGE3D_RAY_ACTORS='two' is not an integer"):
        RayResources.from_env({"CPU": 4.0})


def _generate(tmp_path: Path, world, params, jobs, out: Path, *, ray_executor: bool, monkeypatch):
    from judge3d.pipeline.mesh_sets import generate_set
    from judge3d.pipeline.generator_replica import GeneratorReplica

    monkeypatch.setenv(EXECUTOR_ENV, "ray" if ray_executor else "local")
    replica = GeneratorReplica(str(tmp_path / "gen"), "cpu", 2, 0)
    return generate_set(replica, jobs, out, params, batch_size=2, workers=1)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def mesh_world(tmp_path_factory):
    from test_generator import tiny_generator
    from test_parallel import _set_params, _world

    from judge3d.pipeline.mesh_sets import plan_set

    root = tmp_path_factory.mktemp("ray_world")
    world = _world(root, "heldout", 3)
    params = _set_params("heldout", n_objects=3, n_seeds=2)
    tiny_generator().save(root / "gen")
    return root, world, params, plan_set(params, "s", world)


def test_generate_on_ray_replicas_is_byte_identical_to_in_process(local_ray, mesh_world, monkeypatch):
    root, world, params, jobs = mesh_world
    local = _generate(root, world, params, jobs, root / "local", ray_executor=False, monkeypatch=monkeypatch)
    on_ray = _generate(root, world, params, jobs, root / "ray", ray_executor=True, monkeypatch=monkeypatch)
    strip = lambda rows, out: [{k: (v.replace(str(out), "<out>") if isinstance(v, str) else v)  # noqa: E731
                                for k, v in r.items()} for r in rows]
    assert strip(on_ray, root / "ray") == strip(local, root / "local")
    assert len(on_ray) == 6 and not any(r["empty"] for r in on_ray)
    local_files, ray_files = _files(root / "local"), _files(root / "ray")
    assert sorted(ray_files) == sorted(local_files)
    for name, data in local_files.items():
        if name != "manifest.jsonl":  # holds the out dir's path
            assert ray_files[name] == data, f"{name} differs between the Ray and the in-process run"


def test_a_sigkilled_replica_is_retried_or_fails_cleanly_and_a_rerun_is_identical(local_ray, mesh_world, monkeypatch):
    import ray.cloudpickle

    import judge3d.pipeline.mesh_sets as mesh_sets

    root, world, params, jobs = mesh_world
    local = root / "local"
    if not local.exists():
        _generate(root, world, params, jobs, local, ray_executor=False, monkeypatch=monkeypatch)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    victim = jobs[2].candidate  # the first member of the second batch (batches of 2)
    marker = root / "killed.pid"

    real_factory = mesh_sets._SetBatchOnReplica

    def dying_factory(replica, score):
        return _KillsItsWorkerOnce(real_factory(replica, score), victim, str(marker))

    monkeypatch.setattr(mesh_sets, "_SetBatchOnReplica", dying_factory)
    out = root / "killed"
    # No restarts allowed: the stage fails, naming where it stopped, and keeps the batch before it.
    monkeypatch.setenv(RETRIES_ENV, "0")
    with pytest.raises(RayExecutorError, match=rf"work item candidates {victim}\.\.\S+ did not finish: its replica "
                                               r"died 1 time\(s\).*the 1 of 3 work items before it are done"):
        _generate(root, world, params, jobs, out, ray_executor=True, monkeypatch=monkeypatch)
    assert marker.is_file(), "the replica did not kill itself"
    assert [r["candidate"] for r in read_jsonl(out / ".partial.jsonl")] == [j.candidate for j in jobs[:2]]
    assert not (out / "manifest.jsonl").exists(), "a failed run must not leave a manifest"
    # With restarts, a replica killed mid-item is replaced and the item rerun: the same files as in-process.
    marker.unlink()
    (out / ".partial.jsonl").unlink()
    monkeypatch.setenv(RETRIES_ENV, "2")
    _generate(root, world, params, jobs, out, ray_executor=True, monkeypatch=monkeypatch)
    assert marker.is_file(), "the replica did not kill itself"
    for name, data in _files(local).items():
        if name != "manifest.jsonl":
            assert (out / name).read_bytes() == data, f"{name} differs after a replica was killed and retried"


@dataclass(frozen=True)
class _KillsItsWorkerOnce:
    """Wraps the generate work-item factory: the replica that gets the batch starting with ``victim``
    SIGKILLs its own process the first time (``marker`` records that it did), so a worker dies
    mid-item at a known point. Pickled by value, so Ray workers need not import this test module."""
    inner: Any
    victim: str
    marker: str

    def __call__(self):
        run = self.inner()

        def run_or_die(batch):
            if batch[0].candidate == self.victim and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return run(batch)
        return run_or_die


def test_a_failing_work_item_is_named_and_a_rerun_resumes(local_ray, mesh_world, monkeypatch):
    from dataclasses import replace

    root, world, params, jobs = mesh_world
    broken = jobs[:2] + [replace(jobs[2], image_path=str(root / "no-such-image.png"))] + jobs[3:]
    out = root / "broken"
    with pytest.raises(RayExecutorError, match=rf"work item candidates {broken[2].candidate}.*no-such-image"):
        _generate(root, world, params, broken, out, ray_executor=True, monkeypatch=monkeypatch)
    finished = read_jsonl(out / ".partial.jsonl")
    assert [r["candidate"] for r in finished] == [j.candidate for j in jobs[:2]], "the batch before it is kept"
    assert not (out / "manifest.jsonl").exists(), "a failed run must not leave a manifest"
    rows = _generate(root, world, params, jobs, out, ray_executor=True, monkeypatch=monkeypatch)
    assert [r["candidate"] for r in rows] == [j.candidate for j in jobs]


@pytest.fixture(scope="module")
def judged_pairs(tmp_path_factory):
    from PIL import Image

    from judge3d.judges.protocol import Pair
    from judge3d.judges.tiny import build_tiny_qwen25vl

    root = tmp_path_factory.mktemp("ray_judge")
    build_tiny_qwen25vl(root / "judge", seed=0)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = root / f"m{i}.png"
        Image.fromarray(rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    pairs = [Pair(f"p{i}", f"o{i % 3}", paths[i], paths[(i + 1) % 6]) for i in range(6)]
    params = {"seed": 0, "judges": {"eval": {"model": str(root / "judge")}},
              "judge": {"dtype": "float32", "device": "cpu", "attn_implementation": "sdpa", "batch_size": 3,
                        "servers": {"eval": None}}}
    return root, pairs, params


def test_judging_on_ray_replicas_logs_byte_identical_rows(local_ray, judged_pairs, monkeypatch):
    from judge3d.judges.protocol import run_pairs
    from judge3d.pipeline.judging import load_judge
    from judge3d.pipeline.judge_replica import RayJudge

    root, pairs, params = judged_pairs
    prompt = "A: <image1> B: <image2> Better 3D shape: A or B?"
    monkeypatch.setenv(EXECUTOR_ENV, "local")
    local = load_judge(params, "eval")
    run_pairs(local, pairs, root / "local.jsonl", prompt, batch_size=4, show_progress=False)
    monkeypatch.setenv(EXECUTOR_ENV, "ray")
    remote = load_judge(params, "eval")
    assert isinstance(remote, RayJudge) and remote.judge_id == local.judge_id
    run_pairs(remote, pairs, root / "ray.jsonl", prompt, batch_size=4, show_progress=False)
    assert (root / "ray.jsonl").read_bytes() == (root / "local.jsonl").read_bytes()
    assert len(read_jsonl(root / "ray.jsonl")) == 12
