"""Conditioner repair: a zero-initialised residual MLP on the conditioning tokens.

``repaired = cond + W2 gelu(W1 cond)`` applied token-wise, with ``W2 = 0`` at init so the adapter
starts as the identity. It is trained (flow model frozen) to map degraded-image tokens to the same
object's clean-image tokens; at sampling time the generator gets ``repaired_cond(cond)``. The
unconditional branch stays zeros (the generator derives it from the repaired cond's shape).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

REPAIR_CONFIG = "repair_config.json"
REPAIR_WEIGHTS = "repair.safetensors"


class ConditionRepair(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"repair adapter needs dim, hidden >= 1, got {dim}, {hidden}")
        self.dim, self.hidden = int(dim), int(hidden)
        self.fc1 = nn.Linear(self.dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-1] != self.dim:
            raise ValueError(f"repair adapter expects token dim {self.dim}, got {cond.shape[-1]}")
        return cond + self.fc2(F.gelu(self.fc1(cond)))

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(out_dir / REPAIR_WEIGHTS), metadata={"kind": "condition_repair"})
        (out_dir / REPAIR_CONFIG).write_text(json.dumps({"dim": self.dim, "hidden": self.hidden},
                                                        indent=2, sort_keys=True) + "\n")
        return out_dir

    @classmethod
    def load(cls, adapter_dir: str | Path, device: str | torch.device = "cpu") -> "ConditionRepair":
        adapter_dir = Path(adapter_dir)
        missing = [n for n in (REPAIR_CONFIG, REPAIR_WEIGHTS) if not (adapter_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"repair adapter {adapter_dir}: missing {', '.join(missing)}; train it with "
                                    f"`python stages/train_adapter.py --arm repair_<severity>`")
        cfg = json.loads((adapter_dir / REPAIR_CONFIG).read_text())
        model = cls(cfg["dim"], cfg["hidden"])
        model.load_state_dict(load_file(str(adapter_dir / REPAIR_WEIGHTS), device="cpu"), strict=True)
        return model.to(device).eval()


def is_repair_dir(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / REPAIR_CONFIG).is_file()
