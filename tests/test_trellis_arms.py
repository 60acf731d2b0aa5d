"""Every arm on TRELLIS, at the backend and adapt layer: LoRA on the structured-latent flow's
SparseLinear layers (peft's custom-module hook, ``judge3d.adapt.lora.sparse_lora_layer``) and on the
sparse-structure flow (peft's stock LoRA), the arms' losses on the adapted stage's flow-matching errors, the training
loop, probes, and conditioner repair on 1374-token inputs. TRELLIS's own classes at tiny sizes
(``write_tiny_pipeline``); the CPU stand-ins are tests/trellis_stand_ins.py. Without TRELLIS's source
or spconv these tests skip."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import trellis_stand_ins as stand_ins
from judge3d.adapt import apply_arm, lora
from judge3d.adapt.arms import arm_spec
from judge3d.adapt.data import FeaturePairs, TargetSet
from judge3d.adapt.losses import sft_loss
from judge3d.adapt.probes import fm_mse, make_probe_set
from judge3d.adapt.repair import ConditionRepair
from judge3d.adapt.train import lora_step_loss, train_lora_arm, train_repair_arm, write_arm_file
from judge3d.generators.stages import SparseLatent, StageSampler

needs_trellis = pytest.mark.skipif(stand_ins.missing_requirement() is not None,
                                   reason=f"{stand_ins.missing_requirement()}: {stand_ins.ENABLE_HINT}")
SS, SLAT = "ss", "slat"        # judge3d.generators.trellis.SS_STAGE / SLAT_STAGE (importable without TRELLIS)
# DSO's targets on the sparse-structure flow (r 64, alpha 128 at full size): attention projections.
SS_TARGETS = ["to_q", "to_kv", "to_qkv", "to_out"]
# On the SLat flow: its SparseLinear layers (feed-forward, input and output) and the attention projections.
SLAT_TARGETS = ["mlp.0", "mlp.2", "input_layer", "out_layer", "to_q", "to_kv", "to_qkv", "to_out"]
TARGETS = {SS: SS_TARGETS, SLAT: SLAT_TARGETS}
N_OBJECTS = 6
COND_TOKENS = 6
FULL_SIZE_TOKENS = 1374        # DINOv2-with-registers at 518 px: 1 + 4 registers + 37^2 patches
FAST = {SS: StageSampler(steps=2, cfg_strength=0.0), SLAT: StageSampler(steps=2, cfg_strength=0.0)}


@pytest.fixture(scope="module")
def trellis():
    yield from stand_ins.cpu_trellis()


@pytest.fixture(scope="module")
def pipeline(trellis, tmp_path_factory):
    from judge3d.generators.trellis import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("trellis") / "tiny", seed=0)


def fresh_generator(pipeline):
    from judge3d.generators.trellis import TrellisGenerator

    return TrellisGenerator.load(pipeline, device="cpu")


@dataclass
class Samples:
    cond: torch.Tensor
    winners: dict          # stage -> latents of N_OBJECTS samples
    losers: dict


@pytest.fixture(scope="module")
def samples(pipeline) -> Samples:
    """Two samples per object (different seeds): the saved latents the arms train on."""
    generator = fresh_generator(pipeline)
    g = torch.Generator().manual_seed(0)
    cond = torch.nn.functional.layer_norm(torch.randn((N_OBJECTS, COND_TOKENS, generator.cond_channels), generator=g),
                                          (generator.cond_channels,))
    winners = generator.sample(cond, FAST, seed=list(range(100, 100 + N_OBJECTS)))
    losers = generator.sample(cond, FAST, seed=list(range(200, 200 + N_OBJECTS)))
    assert (winners[SLAT].voxel_counts() > 0).all() and (losers[SLAT].voxel_counts() > 0).all()
    return Samples(cond, winners, losers)


def values(v):
    return v.feats if isinstance(v, SparseLatent) else v


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights by their names without peft's wrapping."""
    return {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
            for k, v in model.state_dict().items() if "lora_" not in k}


def changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def method_params(stage: str, **arms) -> dict:
    return {"seed": 0, "train_seed": 0, "method": {
        "beta": 0.1, "reduction": "mean",
        "train": {"lr": 1e-2, "steps": 2, "batch": 3, "grad_clip": 1.0, "p_uncond": 0.0, "checkpoint_every": 10},
        "lora": {"stage": stage, "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": TARGETS[stage]},
        "orpo": {"lambda": 0.1, "c": 1.0}, "probe": {"n_objects": 2, "threshold": 3.0},
        "repair": {"hidden": 16, "lr": 1e-2, "steps": 20, "batch": 4, "checkpoint_every": 100}},
        "arms": arms or {"arm": {"kind": "sft_best"}}}


# -- LoRA layers ------------------------------------------------------------------------------------
@needs_trellis
@pytest.mark.parametrize("stage_name", [SS, SLAT])
def test_lora_identity_disable_step_reload(stage_name, trellis, pipeline, samples, tmp_path):
    """At init the adapted flow is the base; disabled it is the base; one step changes only LoRA
    weights; save -> load onto a fresh base gives the same outputs; merging leaves TRELLIS's layers."""
    from judge3d.generators.trellis import save_trellis_model

    SparseLoraLinear = lora.sparse_lora_layer()
    generator = fresh_generator(pipeline)
    stage = generator.stage(stage_name)
    x0, cond = samples.winners[stage_name], samples.cond
    t = torch.linspace(0.2, 0.9, N_OBJECTS)
    noise = stage.noise_like(x0, list(range(N_OBJECTS)))
    probe = make_probe_set(stage, x0, cond, seed=3)

    def velocity():
        with torch.no_grad():
            return values(stage.velocity(x0, t, cond)).clone()

    base, base_probe = velocity(), fm_mse(generator, probe)
    sparse_linears = [n for n, m in stage.flow_model.named_modules() if isinstance(m, trellis.sparse.SparseLinear)]
    torch.manual_seed(0)
    stage.flow_model = model = lora.add_lora(stage.flow_model, rank=4, alpha=8.0, dropout=0.0,
                                             targets=TARGETS[stage_name])
    sparse_lora = [n for n, m in model.named_modules() if isinstance(m, SparseLoraLinear)]
    if stage_name == SLAT:     # every targeted SparseLinear got the sparse layer, the nn.Linear ones stock LoRA
        targeted = [n for n in sparse_linears if any(n == k or n.endswith("." + k) for k in SLAT_TARGETS)]
        assert len(targeted) == 6
        assert sorted(n.replace("base_model.model.", "") for n in sparse_lora) == sorted(targeted)
        assert any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    else:
        assert not sparse_linears and not sparse_lora
    assert torch.equal(velocity(), base)
    assert fm_mse(generator, probe) == base_probe
    with lora.reference(model):
        assert torch.equal(velocity(), base)

    before = base_state(model)
    lora_before = lora.lora_state(model)
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    sft_loss(stage.flow_errors(x0, cond, t=t, noise=noise)).backward()
    opt.step()
    assert not changed_keys(before, base_state(model))                  # base weights untouched
    lora_after = lora.lora_state(model)
    assert changed_keys(lora_before, lora_after) == set(lora_before)    # every lora_A and lora_B moved
    adapted = velocity()
    assert not torch.allclose(adapted, base)
    assert fm_mse(generator, probe) != base_probe
    with lora.reference(model):
        assert torch.equal(velocity(), base)

    lora.save_adapter(model, tmp_path / "adapter")
    fresh = fresh_generator(pipeline)
    fresh_stage = fresh.stage(stage_name)
    fresh_stage.flow_model = lora.load_adapter(fresh_stage.flow_model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(values(fresh_stage.velocity(x0, t, cond)), adapted)
    assert len([m for m in fresh_stage.flow_model.modules() if isinstance(m, SparseLoraLinear)]) == len(sparse_lora)

    merged = fresh_stage.flow_model.merge_and_unload()
    assert not any("lora_" in k for k in merged.state_dict())
    assert [n for n, m in merged.named_modules() if isinstance(m, trellis.sparse.SparseLinear)] == sparse_linears
    fresh_stage.flow_model = merged
    with torch.no_grad():
        assert torch.allclose(values(fresh_stage.velocity(x0, t, cond)), adapted, atol=1e-5)
    save_trellis_model(merged, fresh.configs["sparse_structure_flow_model" if stage_name == SS else "slat_flow_model"],
                       tmp_path / "merged")      # TRELLIS's layout again, loadable by TRELLIS


@needs_trellis
def test_models_without_sparse_layers_take_peft_stock_path(trellis, pipeline):
    """Only linear classes with their own forward (SparseLinear) get the custom layer."""
    generator = fresh_generator(pipeline)
    assert lora.sparse_linear_types(generator.stage(SS).flow_model) == []
    assert lora.sparse_linear_types(generator.stage(SLAT).flow_model) == [trellis.sparse.SparseLinear]


@needs_trellis
def test_sparse_lora_on_an_fp16_slat_flow(trellis):
    """TRELLIS-image-large's flows run their blocks in fp16 (use_fp16): the adapter stays float32
    (peft's autocast_adapter_dtype), the output keeps the base's dtype, and at init it is the base."""
    from judge3d.generators.trellis import SLAT_FLOW, tiny_model_configs

    SparseLoraLinear = lora.sparse_lora_layer()
    torch.manual_seed(0)
    flow = trellis.models.SLatFlowModel(**{**tiny_model_configs()[SLAT_FLOW]["args"], "use_fp16": True})
    with torch.no_grad():
        for p in flow.parameters():       # TRELLIS zero-initialises its output layers: act on the input
            if not p.any():
                p.normal_(0.0, 0.05)
    xyz = torch.unique(torch.randint(0, 8, (40, 3), generator=torch.Generator().manual_seed(1)), dim=0)
    x = trellis.sparse.SparseTensor(feats=torch.randn((len(xyz), 8)),
                                    coords=torch.cat([torch.zeros((len(xyz), 1), dtype=torch.long), xyz], 1).int())
    t, cond = torch.tensor([500.0]), torch.randn((1, COND_TOKENS, 64))
    with torch.no_grad():
        base = flow(x, t, cond).feats
    model = lora.add_lora(flow, 4, 8.0, 0.0, SLAT_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, SparseLoraLinear)]
    assert any(m.get_base_layer().weight.dtype == torch.float16 for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond).feats, base)
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    model(x, t, cond).feats.pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        after = model(x, t, cond).feats
    assert after.dtype == base.dtype and torch.isfinite(after).all() and not torch.allclose(after, base)


# -- the arms' losses on TRELLIS stage errors ---------------------------------------------------------
def pair_data(samples: Samples, stage: str) -> TargetSet:
    return TargetSet([f"obj{i}" for i in range(N_OBJECTS)], samples.cond, samples.winners[stage], samples.losers[stage])


@needs_trellis
@pytest.mark.parametrize("stage_name", [SS, SLAT])
def test_arm_steps_on_each_stage(stage_name, pipeline, samples):
    """DPO with policy = reference (LoRA at init) is log 2 on the stage's errors (one t and noise per
    pair, shared by policy and reference); an SFT-on-best, SFT-on-clean, DPO and ORPO step each run
    through the arms' step loss and move the adapter weights only."""
    generator = fresh_generator(pipeline)
    params = method_params(stage_name, dpo={"kind": "dpo"}, orpo={"kind": "orpo"})
    settings = {**arm_spec(params, "dpo").settings, **arm_spec(params, "orpo").settings}
    stage = generator.stage(stage_name)
    torch.manual_seed(0)
    stage.flow_model = model = lora.add_lora(stage.flow_model, 4, 8.0, 0.0, TARGETS[stage_name])
    data, idx = pair_data(samples, stage_name), torch.tensor([0, 3, 5])

    loss, logs = lora_step_loss(generator, "dpo", data, idx, settings, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert logs["inside_abs_mean"] == 0.0 and logs["e_w"] == logs["e_w_ref"] and logs["e_l"] == logs["e_l_ref"]
    assert logs["e_w"] != logs["e_l"]

    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    base = base_state(model)
    for step, kind in enumerate(["sft_best", "sft_clean", "dpo", "orpo"]):
        adapter = lora.lora_state(model)
        opt.zero_grad()
        loss, logs = lora_step_loss(generator, kind, data, idx, settings, torch.Generator().manual_seed(10 + step))
        assert torch.isfinite(loss) and logs["loss"] == loss.item()
        loss.backward()
        opt.step()
        assert changed_keys(adapter, lora.lora_state(model)), kind
        assert not changed_keys(base, base_state(model)), kind
    # A trained policy is no longer its reference: DPO leaves log 2.
    loss, logs = lora_step_loss(generator, "dpo", data, idx, settings, torch.Generator().manual_seed(1))
    assert loss.item() != pytest.approx(math.log(2.0), abs=1e-7) and logs["inside_abs_mean"] > 0


@needs_trellis
def test_sparse_errors_do_not_depend_on_the_batch(pipeline, samples):
    """The SLat stage's per-sample errors on a batch of sparse latents equal each sample's alone."""
    stage = fresh_generator(pipeline).stage(SLAT)
    x0, cond = samples.winners[SLAT], samples.cond
    t = torch.linspace(0.1, 0.8, N_OBJECTS)
    noise = stage.noise_like(x0, list(range(N_OBJECTS)))
    with torch.no_grad():
        batch = stage.flow_errors(x0, cond, t=t, noise=noise)
        alone = torch.cat([stage.flow_errors(x0.select([i]), cond[i:i + 1], t=t[i:i + 1], noise=noise.select([i]))
                           for i in range(N_OBJECTS)])
    assert torch.allclose(batch, alone, rtol=1e-5)


# -- the training loop, probes and arm loading on TRELLIS ---------------------------------------------
@needs_trellis
@pytest.mark.parametrize("stage_name,kind", [(SS, "sft_best"), (SLAT, "dpo")])
def test_train_lora_arm_and_apply_it(stage_name, kind, pipeline, samples, tmp_path):
    """train_lora_arm on a TRELLIS stage: FM-MSE probes before and after, the adapter saved; apply_arm
    puts it on a fresh generator's stage and gives the trained outputs."""
    generator = fresh_generator(pipeline)
    spec = arm_spec(method_params(stage_name, arm={"kind": kind}), "arm")
    assert spec.adapts == stage_name
    metrics = train_lora_arm(generator, spec, pair_data(samples, stage_name), seed=0, out_dir=tmp_path / "arm")
    assert math.isfinite(metrics["fm_mse_before"]) and math.isfinite(metrics["fm_mse_after"])
    assert metrics["fm_mse_after"] != metrics["fm_mse_before"] and not metrics["diverged"]
    assert metrics["n_train"] == N_OBJECTS - 2 and metrics["n_probe"] == 2
    if kind == "dpo":
        assert 0.0 <= metrics["implicit_accuracy"] <= 1.0 and math.isfinite(metrics["probe_margin"])
    write_arm_file(tmp_path / "arm", spec)

    x0, t = samples.winners[stage_name], torch.full((N_OBJECTS,), 0.5)
    with torch.no_grad():
        trained = values(generator.stage(stage_name).velocity(x0, t, samples.cond))
    fresh = fresh_generator(pipeline)
    with torch.no_grad():
        base = values(fresh.stage(stage_name).velocity(x0, t, samples.cond))
    transform = apply_arm(fresh, tmp_path / "arm")
    assert torch.equal(transform(samples.cond), samples.cond)
    with torch.no_grad():
        assert torch.equal(values(fresh.stage(stage_name).velocity(x0, t, samples.cond)), trained)
    assert not torch.allclose(trained, base)
    other = SLAT if stage_name == SS else SS                      # the other stage stays the base
    assert not lora.is_lora_model(fresh.stage(other).flow_model)
    outputs = fresh.sample(samples.cond[:2], FAST, seed=[1, 2])   # both stages still sample with the adapter on
    assert (outputs[SLAT].voxel_counts() > 0).all()


# -- conditioner repair at TRELLIS's token count ---------------------------------------------------------
@needs_trellis
def test_condition_repair_on_1374_tokens(pipeline, tmp_path):
    """At init the repair adapter is the identity on (B, 1374, D) tokens and so leaves both stages'
    errors unchanged; trained, it lowers feat-MSE; apply_arm gives the trained transform."""
    generator = fresh_generator(pipeline)
    dim = generator.cond_channels
    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.layer_norm(torch.randn((8, FULL_SIZE_TOKENS, dim), generator=g), (dim,))
    degraded = clean + 0.3 * torch.randn(clean.shape, generator=g) + 0.2

    torch.manual_seed(0)
    repair = ConditionRepair(dim, 16)
    with torch.no_grad():
        assert torch.equal(repair(degraded[:2]), degraded[:2])
    x0 = generator.sample(clean[:2], FAST, seed=[1, 2])
    for name in (SS, SLAT):
        stage = generator.stage(name)
        t = torch.tensor([0.3, 0.7])
        noise = stage.noise_like(x0[name], [5, 6])
        with torch.no_grad():
            plain = stage.flow_errors(x0[name], degraded[:2], t=t, noise=noise)
            repaired = stage.flow_errors(x0[name], repair(degraded[:2]), t=t, noise=noise)
        assert torch.equal(plain, repaired)

    params = method_params(SS, repair_severe={"kind": "repair", "severity": "severe"})
    spec = arm_spec(params, "repair_severe")
    data = FeaturePairs([f"obj{i}" for i in range(8)], degraded, clean)
    metrics = train_repair_arm(spec, data, seed=0, out_dir=tmp_path / "repair")
    assert metrics["feat_mse_after"] < metrics["feat_mse_before"]
    write_arm_file(tmp_path / "repair", spec)
    transform = apply_arm(generator, tmp_path / "repair")
    trained = ConditionRepair.load(tmp_path / "repair")
    with torch.no_grad():
        assert torch.equal(transform(degraded[:2]), trained(degraded[:2]))
        assert not torch.equal(transform(degraded[:2]), degraded[:2])
    assert not lora.is_lora_model(generator.stage(SS).flow_model)   # repair leaves the flows alone
