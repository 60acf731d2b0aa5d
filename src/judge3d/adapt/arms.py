"""The arm registry: each specialization arm is one entry of ``arms`` in params.yaml.

An arm's settings are ``method`` (shared defaults) deep-merged with ``arms.<arm>`` (its overrides).
Everything else about it is derived here from its kind and severity: the regime it is evaluated in,
its family, the generator part it adapts, its table label and its files. A new arm is therefore one
params entry (plus a loss function, for a new kind); every stage iterates :func:`arm_specs`.

Each spec also names the exact params keys each of its stages reads (``param_keys`` for
train-adapter, ``regime_keys`` for judge-eval, ``label_keys`` for arm-metrics), which is what its
dvc.yaml entries list, so that ``dvc exp run -S method.beta=0.5`` reruns only the arms that read
``method.beta``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from judge3d.core.config import ParamsError, deep_merge, require
from judge3d.world.degrade import SEVERITIES

KINDS = ("sft_best", "dpo", "orpo", "sft_clean", "repair")
SEVERITY_KINDS = ("sft_clean", "repair")    # trained on inputs degraded at the arm's severity
FAMILIES = ("flow", "repair")
# method.* keys each kind reads (beyond `seed` and its own `arms.<arm>` entry).
_LORA_KEYS = ("train", "lora", "probe")
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "sft_best": _LORA_KEYS,
    "sft_clean": _LORA_KEYS,
    "dpo": _LORA_KEYS + ("beta", "reduction"),
    "orpo": _LORA_KEYS + ("orpo", "reduction"),
    "repair": ("repair", "probe"),
}
ARM_ONLY_KEYS = ("kind", "severity", "display")
# The study table's label per kind; ``{key}`` is filled with the arm's effective ``key`` setting.
DEFAULT_DISPLAY = {"sft_best": "SFT-on-best", "dpo": "DPO β={beta}", "orpo": "ORPO",
                   "sft_clean": "SFT-on-clean", "repair": "Conditioner-repair"}
DEFAULT_LORA_STAGE = "flow"                 # the generator flow stage LoRA adapts (method.lora.stage)
ADAPTS_LABELS = {"flow": "flow DiT"}        # the tables' name for what is adapted (else its own name)
_FIELD = re.compile(r"\{(\w+)\}")


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------
@dataclass
class ArmSpec:
    arm: str
    kind: str
    severity: str | None
    settings: dict[str, Any]        # effective values of the method keys this kind reads
    param_keys: list[str]           # what train-adapter@<arm> reads (its dvc.yaml params)
    display: str = ""               # the study table's "Intervention", settings filled in
    label_keys: list[str] = field(default_factory=list)  # what arm-metrics@<arm> reads of the arm

    def fingerprint(self) -> str:
        blob = json.dumps({"arm": self.arm, "kind": self.kind, "severity": self.severity,
                           "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def regime(self) -> str:
        """The input regime the arm is evaluated in: its severity, or clean."""
        return self.severity or "clean"

    @property
    def regime_keys(self) -> list[str]:
        """The params key the regime comes from (judge-eval@<arm> reads only this of the arm)."""
        return [f"arms.{self.arm}.severity" if self.severity else f"arms.{self.arm}.kind"]

    @property
    def regime_label(self) -> str:
        return "clean" if self.regime == "clean" else f"hard ({self.regime})"

    @property
    def family(self) -> str:
        return "repair" if self.kind == "repair" else "flow"

    @property
    def adapts(self) -> str:
        """The generator part the arm trains: the conditioner (repair) or a flow stage (LoRA)."""
        if self.kind == "repair":
            return "conditioner"
        return str(self.settings["lora"].get("stage", DEFAULT_LORA_STAGE))

    @property
    def adapts_label(self) -> str:
        return ADAPTS_LABELS.get(self.adapts, self.adapts)


def _setting_key(arm: str, block: Mapping[str, Any], key: str) -> str:
    """Where the effective ``key`` setting of an arm comes from: its own entry or ``method``."""
    return f"arms.{arm}.{key}" if key in block else f"method.{key}"


def arm_spec(params: Mapping[str, Any], arm: str) -> ArmSpec:
    """Resolve ``arms.<arm>`` over ``method`` and validate; unknown override keys are an error."""
    arms = require(params, "arms", dict, hint="Add the arms block (see params.yaml).")
    if arm not in arms:
        raise ParamsError(f"params.yaml: no arm '{arm}' under 'arms' (known: {sorted(arms)})")
    block = require(params, f"arms.{arm}", dict)
    kind = require(params, f"arms.{arm}.kind", str, check=lambda k: k in KINDS,
                   hint=f"kind must be one of {list(KINDS)}.")
    method = require(params, "method", dict)
    wanted = METHOD_KEYS[kind]
    unknown = set(block) - set(wanted) - set(ARM_ONLY_KEYS)
    if kind not in SEVERITY_KINDS:
        unknown |= set(block) & {"severity"}
    if unknown:
        raise ParamsError(f"params.yaml: arms.{arm} sets {sorted(unknown)}, which a '{kind}' arm does not read "
                          f"(it reads {list(ARM_ONLY_KEYS) + list(wanted)})")
    severity = None
    keys = ["train_seed", "base.device", f"arms.{arm}.kind"]
    if kind in SEVERITY_KINDS:
        severity = require(params, f"arms.{arm}.severity", str, check=lambda s: s in SEVERITIES,
                           hint=f"severity must be one of {list(SEVERITIES)}.")
        keys.append(f"arms.{arm}.severity")
    settings = {}
    for key in wanted:
        override = block.get(key)
        if key in block:
            keys.append(f"arms.{arm}.{key}")
        if key not in block or isinstance(override, Mapping):
            if key not in method:
                raise ParamsError(f"params.yaml: missing key 'method.{key}' (read by arm '{arm}')")
            keys.append(f"method.{key}")
            base = method[key]
            settings[key] = deep_merge(base, override) if isinstance(override, Mapping) else copy.deepcopy(base)
        else:
            settings[key] = copy.deepcopy(override)
    spec = ArmSpec(arm, kind, severity, settings, keys)
    _validate(spec)
    spec.display, display_keys = _display(params, spec, block)
    spec.label_keys = [f"arms.{arm}.kind"] + spec.regime_keys * bool(severity) + display_keys + _stage_keys(spec, block)
    return spec


def _display(params: Mapping[str, Any], spec: ArmSpec, block: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The arm's table label with its ``{setting}`` fields filled, and the params keys it read."""
    keys = []
    if "display" in block:
        template = require(params, f"arms.{spec.arm}.display", str, check=lambda v: bool(v.strip()))
        keys.append(f"arms.{spec.arm}.display")
    else:
        template = DEFAULT_DISPLAY[spec.kind]
    for name in _FIELD.findall(template):
        value = spec.settings.get(name)
        if value is None or isinstance(value, Mapping):
            raise ParamsError(f"params.yaml: arms.{spec.arm} display {template!r} names {{{name}}}, which is not "
                              f"a setting of a '{spec.kind}' arm (it has {sorted(spec.settings)})")
        keys.append(_setting_key(spec.arm, block, name))
    label = _FIELD.sub(lambda m: _format(spec.settings[m.group(1)]), template)
    return label, list(dict.fromkeys(keys))


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _stage_keys(spec: ArmSpec, block: Mapping[str, Any]) -> list[str]:
    """The key naming the flow stage a LoRA arm adapts, where params set one."""
    if spec.kind == "repair" or "stage" not in spec.settings["lora"]:
        return []
    own = block.get("lora")
    return [f"arms.{spec.arm}.lora" if isinstance(own, Mapping) and "stage" in own else "method.lora.stage"]


def _validate(spec: ArmSpec) -> None:
    s = {"method": spec.settings}  # lets `require` name keys as method.<key> (the arm may override them)
    pos = lambda v: v > 0  # noqa: E731
    hint = f"(arm '{spec.arm}': set it in method or arms.{spec.arm})"
    req = lambda key, kind, check=None: require(s, f"method.{key}", kind, check=check, hint=hint)  # noqa: E731
    if spec.kind == "repair":
        req("repair.hidden", int, pos)
        req("repair.lr", float, pos)
        req("repair.steps", int, pos)
        req("repair.batch", int, pos)
    else:
        req("train.lr", float, pos)
        req("train.steps", int, pos)
        req("train.batch", int, pos)
        req("train.grad_clip", float, pos)
        req("train.p_uncond", float, lambda v: 0 <= v < 1)
        req("lora.rank", int, pos)
        req("lora.alpha", float, pos)
        req("lora.dropout", float, lambda v: 0 <= v < 1)
        targets = req("lora.targets", list, lambda v: len(v) > 0 and all(isinstance(t, str) for t in v))
        spec.settings["lora"]["targets"] = list(targets)
    req("probe.n_objects", int, pos)
    req("probe.threshold", float, lambda v: v > 1)
    if spec.kind == "dpo":
        req("beta", float, lambda v: math.isfinite(v) and v > 0)
    if spec.kind in ("dpo", "orpo"):
        req("reduction", str, lambda v: v in ("mean", "sum"))
    if spec.kind == "orpo":
        req("orpo.lambda", float, lambda v: v >= 0)
        req("orpo.c", float, pos)


def arm_names(params: Mapping[str, Any]) -> list[str]:
    """Every arm, in study-table order (the order of the ``arms`` block)."""
    return [str(a) for a in require(params, "arms", dict, check=lambda v: len(v) > 0,
                                    hint="Add at least one arm (see params.yaml).")]


def arm_specs(params: Mapping[str, Any]) -> Iterator[ArmSpec]:
    """Every arm's spec, in study-table order."""
    for arm in arm_names(params):
        yield arm_spec(params, arm)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmInputs:
    """The upstream files the arms train on (the train-adapter stage's CLI can point elsewhere)."""
    base: str = "models/base"
    world: str = "data/world/manifest.jsonl"
    pairs: str = "data/labels/train_pairs.jsonl"
    generated: str = "data/generated/train/manifest.jsonl"
    degraded_dir: str = "data/degraded"          # <degraded_dir>/<severity>/manifest.jsonl

    def degraded(self, severity: str) -> str:
        return f"{self.degraded_dir}/{severity}/manifest.jsonl"

    def training_data(self, spec: ArmSpec) -> list[str]:
        """The data an arm trains on beyond the base and the world (severity-specific, so editing
        `severe` reruns only the arms that read severe inputs)."""
        generated_dir = str(Path(self.generated).parent)
        if spec.kind == "repair":
            return [f"{self.degraded_dir}/{spec.severity}"]
        if spec.kind == "sft_clean":
            return [f"{self.degraded_dir}/{spec.severity}", generated_dir]
        return [self.pairs, generated_dir]


@dataclass(frozen=True)
class ArmPaths:
    """One arm's files, from training to its metrics (one place for the stages, report and verify)."""
    model_dir: Path          # train-adapter: the adapter and arm.json
    train_metrics: Path      # train-adapter: the training probes
    live_dir: Path           # train-adapter: the dvclive curves
    eval_dir: Path           # judge-eval: meshes, montages, manifest and verdict log
    manifest: Path
    verdicts: Path
    base_manifest: Path      # the base's held-out meshes of the arm's regime
    base_montages: Path      # ... and their montages (the judge's reference)
    metrics: Path            # arm-metrics


def arm_paths(arm: str, regime: str, root: str | Path = ".") -> ArmPaths:
    root = Path(root)
    eval_dir = root / "data" / "evals" / arm
    return ArmPaths(model_dir=root / "models" / "arms" / arm,
                    train_metrics=root / "data" / "arms" / arm / "train_metrics.json",
                    live_dir=root / "dvclive" / "train_adapter" / arm,
                    eval_dir=eval_dir, manifest=eval_dir / "manifest.jsonl", verdicts=eval_dir / "verdicts.jsonl",
                    base_manifest=root / "data" / "generated" / f"heldout_{regime}" / "manifest.jsonl",
                    base_montages=root / "data" / "montages" / f"heldout_{regime}" / "manifest.jsonl",
                    metrics=root / "metrics" / "arms" / f"{arm}.json")


# ---------------------------------------------------------------------------------------------
# dvc.yaml agreement
# ---------------------------------------------------------------------------------------------
def dvc_entry_params(dvc_yaml: str | Path, arm: str, stage: str = "train-adapter") -> list[str] | None:
    """The params list of ``stage@arm`` in dvc.yaml (a foreach over a dict), or None if absent."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    entry = ((doc.get("stages") or {}).get(stage) or {}).get("foreach")
    if not isinstance(entry, Mapping) or arm not in entry:
        return None
    item = entry[arm]
    return list(item.get("params", [])) if isinstance(item, Mapping) else None


def check_dvc_params(spec: ArmSpec, dvc_yaml: str | Path = "dvc.yaml", stage: str = "train-adapter",
                     keys: list[str] | None = None) -> None:
    """Refuse to run ``stage@arm`` when dvc.yaml's entry misses a key it reads (its result would go
    stale); ``keys`` defaults to what train-adapter reads."""
    listed = dvc_entry_params(dvc_yaml, spec.arm, stage)
    if listed is None:
        return
    missing = [k for k in (spec.param_keys if keys is None else keys) if k not in listed]
    if missing:
        raise ParamsError(f"dvc.yaml: {stage}@{spec.arm} must list params {missing} (the arm reads them); "
                          "regenerate the arm stages with `judge3d dvc-deps --write`")
