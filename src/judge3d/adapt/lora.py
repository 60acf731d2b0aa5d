"""LoRA on a flow stage's transformer (``generator.stage(name).flow_model``) through peft: wrap,
reference via adapter-disable, save and reload.

The base weights stay frozen (peft marks only ``lora_*`` trainable). The DPO reference is the base
reached with ``with model.disable_adapter():`` on the same module, so no second copy is held.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    import peft  # heavy (imports transformers); only the LoRA arms pay for it
    return peft


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Every target suffix must name at least one ``nn.Linear``; a typo would silently train nothing."""
    names = linear_module_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"LoRA target module(s) {missing} match no nn.Linear in the flow model; "
                         f"linear layer names are {leaves} (set method.lora.targets in params.yaml)")


def add_lora(flow_model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]):
    """Wrap ``flow_model`` in a peft LoRA model; at init the output is bit-identical (B = 0)."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = list(targets)
    check_targets(flow_model, targets)
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=targets, bias="none", init_lora_weights=True)
    model = peft.get_peft_model(flow_model, config)
    set_adaptation_mode(model)
    return model


def set_adaptation_mode(model: nn.Module) -> None:
    """Base in eval mode (its behaviour, and so the reference, stays deterministic); LoRA dropout on."""
    model.eval()
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            m.train()


def is_lora_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference(model: nn.Module) -> Iterator[None]:
    """The DPO reference: the base, reached by disabling the adapter on the same weights."""
    if not is_lora_model(model):
        raise TypeError("reference() needs a peft LoRA model (see add_lora)")
    with model.disable_adapter():
        yield


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; was LoRA added?")
    return params


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """``save_pretrained`` in safetensors: adapter_config.json + adapter_model.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (out_dir / name).is_file():
            raise RuntimeError(f"peft save_pretrained did not write {out_dir / name}")
    # peft keeps target_modules as a set and writes it in the process's hash order, so the same
    # adapter saved by two runs differed byte-wise; a sorted list is read back the same way.
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_adapter(flow_model: nn.Module, adapter_dir: str | Path):
    """Put a saved adapter onto a (fresh) base flow model; returns the peft model in eval mode."""
    adapter_dir = Path(adapter_dir)
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (adapter_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA adapter {adapter_dir}: missing {', '.join(missing)}; train it with "
                                f"`python stages/train_adapter.py --arm <arm>` (dvc repro train-adapter@<arm>)")
    peft = _peft()
    model = peft.PeftModel.from_pretrained(flow_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
