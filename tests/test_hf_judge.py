"""The hf judge backend on tiny random-weight Qwen2.5-VL and InternVL folders (built here, no hub)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from judge3d.core.io import file_sha256  # noqa: E402
from judge3d.judges.hf import HFJudge, JudgeLoadError, gather_answer_ids, p_first_from_logits  # noqa: E402
from judge3d.judges.tiny import (TinyLMSize, TinySizes, TinyVisionSize, build_tiny_internvl,  # noqa: E402
                                 build_tiny_qwen25vl, build_tokenizer)

PROMPT = "Image A is shown first, image B second. Which is the better 3D reconstruction? Answer A or B."
ARCHES = ["qwen2_5_vl", "internvl"]
SMALL = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                  vision=TinyVisionSize(hidden=32, depth=2, heads=2, intermediate=64, patch=14), image_size=56)


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    build_tiny_qwen25vl(root / "qwen2_5_vl", SMALL, seed=1)
    build_tiny_internvl(root / "internvl", SMALL, seed=2)
    return root


@pytest.fixture(scope="module")
def judges(judge_dirs):
    return {arch: HFJudge.load(judge_dirs / arch, batch_size=4) for arch in ARCHES}


def _images(n, seed=0, size=(64, 64)):
    rs = np.random.default_rng(seed)
    return [Image.fromarray((rs.random((size[1], size[0], 3)) * 255).astype("uint8")) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHES)
def test_saved_tiny_judge_reloads_and_judges_both_orders(judge_dirs, judges, arch, tmp_path):
    judge = judges[arch]
    assert judge.model_type == arch
    assert type(judge.model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                           "internvl": "InternVLForConditionalGeneration"}[arch]
    x, y = _images(2, seed=3)
    paths = []
    for i, im in enumerate((x, y)):
        paths.append(tmp_path / f"m{i}.png")
        im.save(paths[-1])
    p = judge.p_first([(paths[0], paths[1]), (paths[1], paths[0])], PROMPT)
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    # PIL input and path input of the same pixels give the same answer
    np.testing.assert_allclose(judge.p_first([(x, y)], PROMPT), p[:1], atol=1e-6)
    # judge id carries a hash of the safetensors weights
    name, digest = judge.judge_id.rsplit("@", 1)
    assert len(digest) == 12 and name.endswith(arch)
    (weights,) = sorted((judge_dirs / arch).glob("*.safetensors"))
    import hashlib
    expect = hashlib.sha256(weights.name.encode() + b"\0" + file_sha256(weights).encode() + b"\n").hexdigest()
    assert digest == expect[:12]


@pytest.mark.parametrize("arch", ARCHES)
def test_answer_ids_bare_and_word_initial(judges, arch):
    tok = judges[arch].tokenizer
    ids = gather_answer_ids(tok)
    for letter in ("A", "B"):
        assert len(ids[letter]) == 2
        assert [tok.decode([i]) for i in ids[letter]] == [letter, " " + letter]
    assert judges[arch].answer_ids == ids


def test_answer_ids_without_word_initial_token_keep_the_bare_one():
    tok = build_tokenizer("qwen2_5_vl")
    ids = gather_answer_ids(tok, letters=("C", "D"))   # no "Ġ C" merge: only the bare byte token
    assert ids == {"C": [tok.convert_tokens_to_ids("C")], "D": [tok.convert_tokens_to_ids("D")]}


def test_p_first_from_logits_hand_computed():
    logits = torch.full((1, 10), -50.0)
    logits[0, [1, 2]] = torch.tensor([0.0, math.log(3.0)])   # A: bare 1, word-initial 3  -> mass 4
    logits[0, [5]] = torch.tensor([0.0])                      # B: mass 1
    p = p_first_from_logits(logits, {"A": [1, 2], "B": [5]})
    assert p.item() == pytest.approx(4 / 5, abs=1e-6)


SLOT_PROMPT = "A: <image1> B: <image2> Better 3D shape: A or B?"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("prompt", [PROMPT, SLOT_PROMPT], ids=["images-first", "image-slots"])
def test_our_input_path_matches_the_processor_and_model_reference(judges, arch, prompt):
    judge = judges[arch]
    ims = _images(3, seed=5) + _images(1, seed=6, size=(90, 40))   # a second aspect ratio -> left padding
    queries = [(0, 1), (1, 0), (2, 3), (3, 2), (3, 0)]
    prepared = judge.prepare_images(ims)
    with torch.no_grad():
        ours = judge.query_logits(prepared, queries, prompt)
    lengths = set()
    for row, (a, b) in enumerate(queries):
        ref_inputs = judge.reference_inputs(ims[a], ims[b], prompt)
        assert ref_inputs["input_ids"][0].tolist() == judge.query_ids(prompt, prepared[a], prepared[b])
        lengths.add(ref_inputs["input_ids"].shape[1])
        with torch.no_grad():
            ref = judge.model(**ref_inputs).logits[:, -1]
        torch.testing.assert_close(ours[row:row + 1], ref, atol=1e-5, rtol=0)
        if arch == "qwen2_5_vl":
            assert "mm_token_type_ids" in ref_inputs
            # the check has teeth: dropping the modality ids (wrong 3-D rope positions) moves the logits
            plain = {k: v for k, v in ref_inputs.items() if k != "mm_token_type_ids"}
            with torch.no_grad():
                wrong = judge.model(**plain).logits[:, -1]
            assert (wrong - ref).abs().max().item() > 1e-4
    if arch == "qwen2_5_vl":
        assert len(lengths) > 1, "the batch must mix sequence lengths to test left padding"


REF_PROMPT = "Input: <image0> A: <image1> B: <image2> Better: A or B?"


@pytest.mark.parametrize("arch", ARCHES)
def test_reference_slot_input_path_matches_the_processor_and_model_reference(judges, arch):
    """Three images (reference, first, second): our ids and logits equal the stock processor's and the
    model's, and p_first (which batches and shares the images) gives the same answers."""
    judge = judges[arch]
    ims = _images(3, seed=5) + _images(1, seed=6, size=(90, 40))
    queries = [(2, 0, 1), (2, 1, 0), (3, 0, 1), (0, 3, 1)]
    prepared = judge.prepare_images(ims)
    with torch.no_grad():
        ours = judge.query_logits(prepared, queries, REF_PROMPT)
    for row, q in enumerate(queries):
        ref_inputs = judge.reference_inputs(*(ims[i] for i in q), prompt=REF_PROMPT)
        ids = ref_inputs["input_ids"][0].tolist()
        assert ids == judge.query_ids(REF_PROMPT, *(prepared[i] for i in q))
        assert ids.count(judge.arch.placeholder_id()) == sum(prepared[i].n_tokens for i in q)
        with torch.no_grad():
            ref = judge.model(**ref_inputs).logits[:, -1]
        torch.testing.assert_close(ours[row:row + 1], ref, atol=1e-5, rtol=0)
    p = judge.p_first([tuple(ims[i] for i in q) for q in queries], REF_PROMPT)
    np.testing.assert_allclose(p, p_first_from_logits(ours, judge.answer_ids).double().numpy(), rtol=0, atol=1e-5)
    assert p[0] != p[2]   # only the reference differs: the judge sees it


def test_malformed_reference_prompt_and_wrong_query_length_fail_clearly(judges):
    from judge3d.judges.hf import prompt_content, prompt_image_count

    assert prompt_image_count(PROMPT) == prompt_image_count(SLOT_PROMPT) == 2
    assert prompt_image_count(REF_PROMPT) == 3
    assert prompt_content(REF_PROMPT) == [
        {"type": "text", "text": "Input: "}, {"type": "image"}, {"type": "text", "text": " A: "}, {"type": "image"},
        {"type": "text", "text": " B: "}, {"type": "image"}, {"type": "text", "text": " Better: A or B?"}]
    for bad in ("A: <image1> ref: <image0> B: <image2>", "<image0> <image0> A: <image1> B: <image2>",
                "Input: <image0> only the reference", "<image0> <image2> <image1>"):
        for parse in (prompt_image_count, prompt_content):
            with pytest.raises(ValueError, match="optionally with the reference slot <image0> once before <image1>"):
                parse(bad)
    judge = judges["qwen2_5_vl"]
    x, y, r = _images(3, seed=8)
    with pytest.raises(ValueError, match=r"query 0 has 2 images but the prompt shows 3 \(reference, first, second\)"):
        judge.p_first([(x, y)], REF_PROMPT)
    with pytest.raises(ValueError, match=r"query 1 has 3 images but the prompt shows 2 \(first, second\)"):
        judge.p_first([(x, y), (r, x, y)], SLOT_PROMPT)


def test_missing_dir_fails_with_its_name(tmp_path):
    missing = tmp_path / "models" / "judges" / "train"
    with pytest.raises(JudgeLoadError, match="pretrain-judges") as info:
        HFJudge.load(missing)
    assert str(missing) in str(info.value)


def _copy(judge_dirs, arch, tmp_path):
    dst = tmp_path / arch
    shutil.copytree(judge_dirs / arch, dst)
    return dst


@pytest.mark.parametrize("arch", ARCHES)
def test_missing_answer_token_fails_at_load(judge_dirs, arch, tmp_path):
    folder = _copy(judge_dirs, arch, tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    # rename the "A" tokens: the tokenizer can no longer produce "A" as one token
    vocab["<no_A>"] = vocab.pop("A")
    vocab["<no_GA>"] = vocab.pop("ĠA")
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m not in (["Ġ", "A"], "Ġ A")]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(JudgeLoadError, match="answer token 'A'"):
        HFJudge.load(folder)


def test_processor_mismatch_fails_at_load(judge_dirs, tmp_path):
    folder = _copy(judge_dirs, "qwen2_5_vl", tmp_path)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["merge_size"] = 1
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(JudgeLoadError, match="merge_size"):
        HFJudge.load(folder)


def test_internvl_seq_length_mismatch_fails_at_load(judge_dirs, tmp_path):
    folder = _copy(judge_dirs, "internvl", tmp_path)
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["image_seq_length"] += 1
    (folder / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(JudgeLoadError, match="image_seq_length"):
        HFJudge.load(folder)


def test_pickle_only_checkpoint_is_refused(judge_dirs, tmp_path):
    folder = _copy(judge_dirs, "internvl", tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(JudgeLoadError, match="safetensors"):
        HFJudge.load(folder)


# ------------------------------------------------------------------ pair data and the degenerate-judge gate
from judge3d.world.corruptions import (build_pairs, corrupt_holes, corrupt_missing_part, corrupt_noise,  # noqa: E402
                                  corrupt_speckle)
from judge3d.judges.train import DegenerateJudgeError, TrainConfig, check_not_degenerate, evaluate_pairs  # noqa: E402


def _cands(scores, obj="o1"):
    return [{"object_id": obj, "montage_path": f"{obj}/{i}.png", "oracle_score": s, "candidate": f"{obj}:{i}"}
            for i, s in enumerate(scores)]


def test_build_pairs_labels_by_oracle_and_kinds():
    pairs = build_pairs(_cands([0.9, 0.5, 0.89, 0.75]) + _cands([0.3, 0.31], obj="o2"), margin=0.02, clear_gap=0.2)
    by = {(p["better"], p["worse"]): p["kind"] for p in pairs}
    assert by[("o1/0.png", "o1/1.png")] == "clear"          # gap 0.40
    assert by[("o1/0.png", "o1/2.png")] == "near"           # gap 0.01 < margin
    assert by[("o1/0.png", "o1/3.png")] == "mild"           # gap 0.15
    assert by[("o1/3.png", "o1/1.png")] == "clear"          # gap 0.25 >= clear_gap
    assert all(p["better_score"] >= p["worse_score"] for p in pairs)
    assert not any(p["object_id"] == "o2" and p["kind"] != "near" for p in pairs)   # never across objects
    assert len(pairs) == 6 + 1


def test_build_pairs_rejects_nan_scores():
    with pytest.raises(ValueError, match="oracle_score"):
        build_pairs(_cands([0.5, float("nan")]), margin=0.02, clear_gap=0.2)


def test_corruptions_are_seeded_and_change_the_mesh():
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box((0.5, 0.3, 0.4))
    legs = trimesh.util.concatenate([box] + [trimesh.creation.box((0.05, 0.3, 0.05)).apply_translation((x, -0.3, 0))
                                             for x in (-0.2, 0.2)])
    a, b, c = (corrupt_noise(box, 0.01, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.vertices, b.vertices) and not np.array_equal(a.vertices, c.vertices)
    holed = corrupt_holes(box, n_holes=2, radius=0.05, seed=3)
    assert not holed.is_watertight
    fewer = corrupt_missing_part(legs, seed=0)
    assert len(fewer.split(only_watertight=False)) == 2


def test_speckle_is_seeded_decoded_and_worse_with_level():
    trimesh = pytest.importorskip("trimesh")
    from judge3d.world.geometry import oracle_metrics, validity

    params = {"geometry": {"fscore_tau": 0.02, "n_surface_samples": 1024, "iou_resolution": 16,
                           "iou_supersample": 2, "reference_factor": 4}}
    box = trimesh.creation.box((0.5, 0.3, 0.4))
    a, b, c = (corrupt_speckle(box, 0.05, seed=s, resolution=16) for s in (1, 1, 2))
    assert np.array_equal(a.vertices, b.vertices) and not np.array_equal(a.vertices, c.vertices)
    assert a.metadata.get("level_set")  # the generator's decode: marching cubes of an occupancy grid
    strong = corrupt_speckle(box, 0.15, seed=1, resolution=16)
    assert validity(strong)["n_components"] > validity(a)["n_components"] > 1  # floaters
    f_mild, f_strong = (oracle_metrics(m, box, params=params)["fscore"] for m in (a, strong))
    assert f_strong < f_mild < 1.0


def test_candidates_decoded_like_generator_lose_primitive_edges(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from judge3d.judges.candidates import build_candidates

    gt = trimesh.creation.box((0.5, 0.3, 0.4))
    gt.export(tmp_path / "gt.ply")
    world = [{"object_id": "judge_eval-0000-box", "category": "box", "split": "judge_eval",
              "mesh_path": str(tmp_path / "gt.ply"), "voxel_path": str(tmp_path / "none.npy")}]
    from judge3d.world.voxel import voxelize
    np.save(tmp_path / "none.npy", voxelize(gt, 16, 2))
    params = {"seed": 0, "world": {"voxel_resolution": 16, "voxel_supersample": 2},
              "geometry": {"fscore_tau": 0.02, "n_surface_samples": 1024, "iou_resolution": 16,
                           "iou_supersample": 2, "reference_factor": 4},
              "judge_data": {"corruptions": ["missing"], "levels": [1], "decode_like_generator": False}}
    raw = {r["source"]: r for r in build_candidates("judge_eval", world, [], tmp_path / "raw", params)}
    params["judge_data"]["decode_like_generator"] = True
    dec = {r["source"]: r for r in build_candidates("judge_eval", world, [], tmp_path / "dec", params)}
    assert raw["ground_truth"]["fscore"] == 1.0 and raw["ground_truth"]["validity"]["n_faces"] == 12
    # Decoded: a marching-cubes surface of many faces, still close to the shape by the oracle.
    assert dec["ground_truth"]["validity"]["n_faces"] > 100
    assert 0.8 < dec["ground_truth"]["fscore"] < 1.0


class _AlwaysFirst:
    judge_id = "always-first@000000000000"

    def p_first(self, pairs, prompt):
        return np.full(len(pairs), 0.9)


def test_position_only_judge_is_refused():
    pairs = [{"pair_id": f"o{i}:clear:0", "object_id": f"o{i}", "better": "a", "worse": "b", "better_score": 0.9,
              "worse_score": 0.5, "kind": "clear"} for i in range(6)]
    metrics = evaluate_pairs(_AlwaysFirst(), pairs, PROMPT)
    assert metrics["clear"]["flip_rate"] == 1.0 and metrics["clear"]["strict"] == 0.0
    with pytest.raises(DegenerateJudgeError, match="position"):
        check_not_degenerate(metrics, TrainConfig(), "always-first")


class _RecordingJudge(_AlwaysFirst):
    def __init__(self):
        self.queries = []

    def p_first(self, pairs, prompt):
        self.queries += list(pairs)
        return super().p_first(pairs, prompt)


def test_reference_aware_training_needs_references_for_every_object_and_shows_them_first():
    from judge3d.judges.tiny import TinySizes
    from judge3d.judges.train import train_judge

    cands = _cands([0.9, 0.5, 0.2]) + _cands([0.8, 0.3], obj="o2")
    args = ("qwen2_5_vl", TinySizes(), cands, "unused-out", REF_PROMPT, TrainConfig())
    with pytest.raises(ValueError, match=r"no reference image for 1 object\(s\) \['o2'\]"):
        train_judge(*args, name="ref", references={"o1": "o1/input.png"})
    with pytest.raises(ValueError, match="names the reference slot <image0>; pass references"):
        train_judge(*args, name="ref")
    with pytest.raises(ValueError, match="no <image0> slot"):
        train_judge("qwen2_5_vl", TinySizes(), cands, "unused-out", PROMPT, TrainConfig(), name="plain",
                    references={"o1": "a.png", "o2": "b.png"})
    pairs = [{"pair_id": f"o{i}:clear:0", "object_id": f"o{i}", "better": "a", "worse": "b", "better_score": 0.9,
              "worse_score": 0.5, "kind": "clear"} for i in range(3)]
    judge = _RecordingJudge()
    evaluate_pairs(judge, pairs, REF_PROMPT, references={f"o{i}": f"ref{i}" for i in range(3)})
    assert judge.queries == [(f"ref{i}", "a", "b") for i in range(3)] + [(f"ref{i}", "b", "a") for i in range(3)]


def _clear(w: int, l: int, f: int) -> dict:
    n = w + l + f
    return {"clear": {"n": n, "W": w, "L": l, "F": f, "strict": w / n, "decisive": w / (w + l), "flip_rate": f / n}}


def test_weak_judge_above_chance_is_saved_and_a_chance_level_one_refused():
    # weak, not degenerate (the pinned mini run's training judge): decisive 256/396, Wilson low 0.60
    check_not_degenerate(_clear(256, 140, 83), TrainConfig(), "weak")
    # consistent verdicts at chance on clear pairs: refused, naming the test
    with pytest.raises(DegenerateJudgeError, match="not above chance"):
        check_not_degenerate(_clear(210, 190, 80), TrainConfig(), "coin")


def test_batches_are_seeded_and_the_curriculum_draws_clear_pairs_first():
    from judge3d.judges.train import sample_batch

    pairs = [{"pair_id": f"o:{k}:{i}", "kind": k, "better": f"{k}{i}b", "worse": f"{k}{i}w"}
             for k in ("clear", "mild") for i in range(40)]
    cfg = TrainConfig(batch_size=8, curriculum_steps=5, seed=3)
    for step in range(12):
        a, fa = sample_batch(pairs, step, cfg, "train")
        b, fb = sample_batch(pairs, step, cfg, "train")
        assert [p["pair_id"] for p in a] == [p["pair_id"] for p in b] and np.array_equal(fa, fb)  # deterministic
        if step < cfg.curriculum_steps:
            assert all(p["kind"] == "clear" for p in a)
    late = [p["kind"] for s in range(5, 30) for p in sample_batch(pairs, s, cfg, "train")[0]]
    assert "mild" in late and "clear" in late                      # after the curriculum: every labelled pair
    other, _ = sample_batch(pairs, 0, TrainConfig(batch_size=8, curriculum_steps=5, seed=4), "train")
    assert [p["pair_id"] for p in other] != [p["pair_id"] for p in sample_batch(pairs, 0, cfg, "train")[0]]
    # no curriculum: the same draws as before the curriculum existed (one seeded stream per step)
    plain, _ = sample_batch(pairs, 7, TrainConfig(batch_size=8, seed=3), "train")
    from judge3d.core.seeding import rng
    idx = rng(3, "judge-batch", "train", 7).choice(len(pairs), 8, replace=False)
    assert [p["pair_id"] for p in plain] == [pairs[i]["pair_id"] for i in idx]


def test_paired_orders_show_each_pair_both_ways_in_one_batch():
    from judge3d.judges.train import sample_batch

    pairs = [{"pair_id": f"o:clear:{i}", "kind": "clear", "better": f"{i}b", "worse": f"{i}w"} for i in range(40)]
    cfg = TrainConfig(batch_size=8, paired_orders=True, seed=3)
    batch, better_first = sample_batch(pairs, 2, cfg, "train")
    ids = [p["pair_id"] for p in batch]
    assert len(batch) == 8 and len(set(ids)) == 4 and ids[0::2] == ids[1::2]
    assert better_first.tolist() == [True, False] * 4           # every pair once each way
    with pytest.raises(ValueError, match="even"):
        TrainConfig.from_params({"batch_size": 7, "paired_orders": True}, seed=0)


def test_prompt_slots_place_each_image_after_its_letter():
    from judge3d.judges.hf import prompt_content

    assert prompt_content("Which? A or B.") == [{"type": "image"}, {"type": "image"},
                                                {"type": "text", "text": "Which? A or B."}]
    assert prompt_content(SLOT_PROMPT) == [
        {"type": "text", "text": "A: "}, {"type": "image"}, {"type": "text", "text": " B: "}, {"type": "image"},
        {"type": "text", "text": " Better 3D shape: A or B?"}]
    assert prompt_content("<image1><image2>Q") == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]
    for bad in ("A: <image1> only one", "<image2> then <image1>", "<image1> <image1> <image2>"):
        with pytest.raises(ValueError, match="image1"):
            prompt_content(bad)


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_judges_init_scaled_to_their_width(arch):
    """initializer_range 0.02 (the checkpoints') shrinks every tiny projection ~4x: the ln 2 plateau."""
    from judge3d.judges.tiny import build_tiny_judge

    sizes = TinySizes(lm=TinyLMSize(hidden=192, layers=1, heads=4, kv_heads=2, intermediate=256),
                      vision=TinyVisionSize(hidden=128, depth=1, heads=4, intermediate=128, patch=14), image_size=56)
    model, _, _ = build_tiny_judge(None, arch, sizes, seed=0, save=False)
    q_proj = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert abs(float(q_proj.std()) - 192 ** -0.5) < 0.1 * 192 ** -0.5


# ------------------------------------------------------------------ fast-path switches (GPU defaults)
WINDOWED = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                     vision=TinyVisionSize(hidden=32, depth=3, heads=2, intermediate=60, patch=14), image_size=84)


@pytest.fixture(scope="module")
def windowed_qwen(tmp_path_factory):
    """A tiny Qwen2.5-VL whose vision windows (56 px) tile its 84 px input unevenly: windows of 16, 8
    and 4 patches in two blocks, full attention in the last, as the 7B model has at 504 px; its vision
    MLP width (60) is not a multiple of 64, like the 7B tower's 3420."""
    root = tmp_path_factory.mktemp("windowed")
    build_tiny_qwen25vl(root / "qwen", WINDOWED, seed=5)
    judge = HFJudge.load(root / "qwen", batch_size=4)
    judge.model.model.visual.window_size = 56
    return judge


def test_gpu_fast_paths_are_off_on_cpu(judges):
    """The CPU pipeline keeps the stock vision attention and inline image processing by default."""
    for judge in judges.values():
        assert judge.arch.grouped_attention is False and judge.prep_workers == 0


def test_grouped_vision_attention_is_bit_identical_to_the_stock_path(windowed_qwen, monkeypatch):
    judge = windowed_qwen
    prepared = judge.prepare_images(_images(3, seed=4))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = {}
    with torch.inference_mode():
        for grouped in (False, True):
            judge.arch.grouped_attention = grouped
            calls.clear()
            out[grouped] = (judge.arch.encode(prepared), len(calls))
    judge.arch.grouped_attention = False
    (stock, n_stock), (grouped, n_grouped) = out[False], out[True]
    # stock: one call per window (4 per image: 16, 8, 8, 4 patches) in 2 blocks + one per image in the
    # full block; grouped: one per distinct length in each windowed block + one for the full block
    assert n_stock == 3 * (4 * 2 + 1) and n_grouped == 3 * 2 + 1
    for a, b in zip(stock, grouped):
        assert torch.equal(a, b)
    pairs = [(im_a, im_b) for im_a, im_b in zip(_images(3, seed=4), _images(3, seed=5))]
    pairs += [(b, a) for a, b in pairs]
    judge.arch.grouped_attention = True
    p_grouped = judge.p_first(pairs, PROMPT)
    judge.arch.grouped_attention = False
    assert np.array_equal(p_grouped, judge.p_first(pairs, PROMPT))


@pytest.mark.parametrize("arch", ARCHES)
def test_threaded_prefetch_gives_the_same_p_first(judges, arch):
    judge = judges[arch]
    ims = _images(6, seed=7)
    pairs = [(ims[i], ims[(i + 1) % 6]) for i in range(6)] + [(ims[(i + 1) % 6], ims[i]) for i in range(6)]
    inline = judge.p_first(pairs, PROMPT)          # batch 4: three batches, so prefetch overlaps
    judge.prep_workers = 2
    try:
        threaded = judge.p_first(pairs, PROMPT)
    finally:
        judge.prep_workers = 0
    assert np.array_equal(inline, threaded)


def test_padded_vision_mlp_computes_the_same_function(windowed_qwen):
    """Zero-padding the vision MLP width only changes rounding: features within float32 noise, same
    verdicts and P(first) to 1e-6 (fp32 here; on the H200 in bf16 the p_first gap was measured in the
    benchmark's check, see judge_throughput.py). The model's own weights are untouched afterwards."""
    judge = windowed_qwen
    mlp = judge.model.model.visual.blocks[0].mlp
    shapes = {k: v.shape for k, v in judge.model.state_dict().items()}
    prepared = judge.prepare_images(_images(3, seed=4))
    with torch.inference_mode():
        stock = judge.arch.encode(prepared)
        judge.arch.pad_mlp = True
        try:
            padded = judge.arch.encode(prepared)
            w, b = judge.arch._padded[mlp.gate_proj]
            assert w.shape == (64, 32) and not w[60:].any() and not b[60:].any()
            pairs = [(a, b) for a, b in zip(_images(3, seed=4), _images(3, seed=5))]
            pairs += [(b, a) for a, b in pairs]
            p_padded = judge.p_first(pairs, PROMPT)
        finally:
            judge.arch.pad_mlp = False
        p_stock = judge.p_first(pairs, PROMPT)
    for a, b in zip(stock, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    judge.arch.pad_mlp = True
    try:
        with torch.enable_grad():     # training: the detached padded copies must not be used
            trained = judge.arch.encode(prepared)
    finally:
        judge.arch.pad_mlp = False
    for a, b in zip(stock, trained):
        assert torch.equal(a, b.detach())
    np.testing.assert_allclose(p_padded, p_stock, rtol=0, atol=1e-6)
    assert ((p_padded > 0.5) == (p_stock > 0.5)).all()
    assert {k: v.shape for k, v in judge.model.state_dict().items()} == shapes
    assert mlp.gate_proj.weight.shape == (60, 32)
