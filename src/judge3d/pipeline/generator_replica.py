"""A generator as a recipe (folder, device, threads, seed, optional arm) rather than a loaded model:
the stage loads it in its own process, or ships it to Ray replicas (:mod:`judge3d.core.ray_executor`),
which load it there, one per GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class GeneratorReplica:
    """A generator to load: ``model_dir`` on ``device`` with ``threads`` intra-op threads (the
    stage's ``generate.threads``) after seeding with ``seed``; ``arm``, if given, puts an arm onto the
    loaded generator and returns the conditioning transform to sample with (judge-eval passes
    :class:`judge3d.pipeline.arm_eval.ArmOnGenerator`)."""
    model_dir: str
    device: str
    threads: int
    seed: int
    arm: Callable[[Any], Callable] | None = None

    def load(self) -> tuple[Any, Callable | None]:
        """(generator, conditioning transform or None)."""
        import torch

        from judge3d.core.seeding import seed_everything
        from judge3d.generators import load_generator

        seed_everything(self.seed)
        torch.set_num_threads(self.threads)
        generator = load_generator(self.model_dir, device=self.device)
        return generator, (None if self.arm is None else self.arm(generator))

    def describe(self) -> str:
        return f"generator {self.model_dir}" + (f" + {self.arm}" if self.arm is not None else "")
