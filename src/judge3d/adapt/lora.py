"""LoRA on a flow stage's transformer (``generator.stage(name).flow_model``) through peft: wrap,
reference via adapter-disable, save and reload.

The base weights stay frozen (peft marks only ``lora_*`` trainable). The DPO reference is the base
reached with ``with model.disable_adapter():`` on the same module, so no second copy is held.

Sparse layers. TRELLIS's structured-latent flow applies ``SparseLinear(nn.Linear)`` to a
``SparseTensor`` and gets one back on the same voxels. peft's stock ``lora.Linear`` would call it with
the SparseTensor and then add ``lora_B(lora_A(x))`` to the result, which fails. Linear layers with
their own forward get :func:`sparse_lora_layer` instead, through peft's custom-module hook
(``LoraConfig._register_custom_module``), on wrapping and on loading: peft's own ``lora.Linear`` (same
parameters, init, scaling, merge, state-dict keys, so ``save_pretrained`` / ``from_pretrained`` /
``disable_adapter`` / ``merge_and_unload`` are unchanged) whose forward adds ``B(A(x.feats))`` to the
base layer's output feats. A model without such layers (the mini flow) takes peft's stock path only.
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    import peft  # heavy (imports transformers); only the LoRA arms pay for it
    return peft


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def sparse_linear_types(model: nn.Module) -> list[type[nn.Module]]:
    """The ``nn.Linear`` subclasses in ``model`` that override forward (TRELLIS's SparseLinear), which
    peft's stock LoRA layer would call with their own input type and then fail to add to."""
    types = {type(m) for m in model.modules()
             if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward}
    return sorted(types, key=lambda t: f"{t.__module__}.{t.__qualname__}")


@functools.cache
def sparse_lora_layer() -> type:
    """peft's ``lora.Linear`` for a linear layer whose input may be a sparse tensor (any object with
    ``feats`` (N, in) and ``replace(feats)`` giving the same voxels with new feats); on a plain tensor
    it is the stock layer. Vanilla LoRA only (no DoRA or other variants, no mixed-adapter batches).
    Built on first use, since peft is imported lazily."""
    lora_linear = _peft().tuners.lora.Linear

    class SparseLoraLinear(lora_linear):
        def update_layer(self, adapter_name, *args, **kwargs):
            super().update_layer(adapter_name, *args, **kwargs)
            if adapter_name in self.lora_variant:     # DoRA and the like change forward; not done here
                raise ValueError(f"LoRA variants (DoRA and the like) are not supported on "
                                 f"{type(self.get_base_layer()).__name__}; use plain LoRA")

        def forward(self, x: Any, *args: Any, **kwargs: Any):
            if isinstance(x, torch.Tensor):
                return super().forward(x, *args, **kwargs)
            if kwargs.get("adapter_names") is not None:
                # peft's per-sample adapter routing (adapter_names=...) has no sparse-tensor form here:
                # an input error, named with the fix, not a stub
                raise ValueError("adapter_names= (a batch mixing adapters) is not supported on sparse tensors; "
                                 "call the model once per adapter (set_adapter) instead")
            # peft's lora.Linear.forward, step for step, on the feats.
            if self.disable_adapters and self.merged:
                self.unmerge()
            out = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return out
            result = out.feats
            result_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                feats = self._cast_input_dtype(x.feats, lora_A.weight.dtype)
                result = result + lora_B(lora_A(self.lora_dropout[name](feats))) * self.scaling[name]
            return out.replace(result.to(result_dtype))

        def __repr__(self) -> str:
            return "sparse_" + super().__repr__()

    SparseLoraLinear.__qualname__ = "SparseLoraLinear"
    return SparseLoraLinear


def _register_sparse_layers(config, model: nn.Module) -> None:
    types = sparse_linear_types(model)
    if types:
        config._register_custom_module({t: sparse_lora_layer() for t in types})


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
    _register_sparse_layers(config, flow_model)
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
    if sparse_linear_types(flow_model):
        # The custom-layer mapping is not part of adapter_config.json: register it on the loaded config.
        config = peft.LoraConfig.from_pretrained(str(adapter_dir))
        _register_sparse_layers(config, flow_model)
        model = peft.PeftModel.from_pretrained(flow_model, str(adapter_dir), is_trainable=False, config=config)
    else:
        model = peft.PeftModel.from_pretrained(flow_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
