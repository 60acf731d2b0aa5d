"""The specialization arms: LoRA on one flow stage's transformer (sft_best, dpo, orpo, sft_clean) and
the conditioner repair adapter (repair_<severity>), with their losses, probes and training loops.

For sampling with a trained arm (judge-eval)::

    gen = load_generator("models/base")
    cond_fn = apply_arm(gen, "models/arms/<arm>")     # LoRA arms wrap gen.stage(<stage>).flow_model in place
    outputs = gen.sample(cond_fn(gen.encode_images(images)), budget.stages, seed=...)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["apply_arm", "read_arm"]


def read_arm(arm_dir: str | Path) -> dict[str, Any]:
    path = Path(arm_dir) / "arm.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the arm first (dvc repro train-adapter@<arm>)")
    return json.loads(path.read_text())


def apply_arm(generator, arm_dir: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Put a trained arm onto ``generator``; return the conditioning transform to sample with.

    LoRA arms: the flow model of the stage the arm adapts (``settings.lora.stage``) becomes the
    peft model with the adapter loaded; the transform is the identity. Repair arms: the flow model is untouched and the transform is the
    repair adapter (``repaired_cond``).
    """
    info = read_arm(arm_dir)
    if info["kind"] == "repair":
        from judge3d.adapt.repair import ConditionRepair
        repair = ConditionRepair.load(arm_dir, device=generator.device)

        @torch.no_grad()
        def repaired_cond(cond: torch.Tensor) -> torch.Tensor:
            return repair(cond)
        return repaired_cond
    from judge3d.adapt.arms import DEFAULT_LORA_STAGE
    from judge3d.adapt.lora import load_adapter
    stage = generator.stage(info["settings"]["lora"].get("stage", DEFAULT_LORA_STAGE))
    stage.flow_model = load_adapter(stage.flow_model, arm_dir)
    return lambda cond: cond
