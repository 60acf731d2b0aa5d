"""Generator design sweep: train the mini generator under params overrides, then score held-out
samples at each sampler budget in voxel space (IoU; boundary F-score = boundary voxels matched
within one voxel). Used to pick `base.model`/`base.train` and to test whether 25-step CFG samples
beat 2-step unguided ones (the quality-contrastive premise). Fast on a GPU (~30 s per config on an
H200); the figures are in benchmarks/results/generator_sweep_h200.txt.

    python benchmarks/generator_sweep.py '[{"name": "base", "steps": 1500},
        {"name": "noaux", "steps": 1500, "o": {"base.train.aux_weight": 0.0}}]'
"""
import copy, json, sys, time
import numpy as np, torch, torch.nn.functional as F
import yaml
from judge3d.generators.pretrain import TrainSettings, build_generator, fit, load_training_set
from judge3d.generators.stages import StageSampler

_, train_img, train_vox = load_training_set("data/world/manifest.jsonl", 32, "train")
_, held_img, held_vox = load_training_set("data/world/manifest.jsonl", 32, "heldout")
d = {"train_img": train_img, "train_vox": train_vox, "held_img": held_img, "held_vox": held_vox}
params0 = yaml.safe_load(open("params.yaml"))
dev = "cuda" if torch.cuda.is_available() else "cpu"


def boundary(occ):
    occ = occ.float()[:, None]
    ero = -F.max_pool3d(-occ, 3, 1, 1)
    return (occ - ero)[:, 0] > 0.5


def bfscore(a, b):
    ba, bb = boundary(a), boundary(b)
    da = F.max_pool3d(ba.float()[:, None], 3, 1, 1)[:, 0] > 0.5
    db = F.max_pool3d(bb.float()[:, None], 3, 1, 1)[:, 0] > 0.5
    prec = (ba & db).flatten(1).sum(1) / ba.flatten(1).sum(1).clamp_min(1)
    rec = (bb & da).flatten(1).sum(1) / bb.flatten(1).sum(1).clamp_min(1)
    return (2 * prec * rec / (prec + rec).clamp_min(1e-9))


def iou(a, b):
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp_min(1)


def run(name, overrides, steps):
    p = copy.deepcopy(params0)
    for k, v in overrides.items():
        node = p
        ks = k.split(".")
        for kk in ks[:-1]:
            node = node[kk]
        node[ks[-1]] = v
    p["base"]["train"]["steps"] = steps
    torch.manual_seed(0)
    gen = build_generator(p, device=dev)
    s = TrainSettings.from_params(p)
    with torch.no_grad():
        img_t = gen.conditioner.preprocess(d["train_img"], "cpu")
    x0 = gen.encode_shapes(d["train_vox"]).cpu()
    t0 = time.time()
    losses = fit(gen, img_t, x0, s, 0, progress=False)
    tt = time.time() - t0
    cond = gen.encode_images(d["held_img"])
    gt = torch.as_tensor(d["held_vox"] > 0.5, device=dev)
    out = {"name": name, "train_s": round(tt, 1), "loss": round(float(np.mean(losses[-50:])), 4)}
    seeds = list(range(1000, 1000 + len(gt)))
    flow = p["sampler"]["stages"]["flow"]
    shared = {"cfg_interval": tuple(flow["cfg_interval"]), "rescale_t": flow["rescale_t"]}
    per = {}
    for budget, (st, cfg) in {"high": (25, 3.0), "high7": (25, 7.5), "high0": (25, 0.0), "default": (12, 3.0), "low": (2, 0.0), "low1": (1, 0.0)}.items():
        lat = gen.sample(cond, StageSampler(st, cfg, **shared), seed=seeds)["flow"]
        occ = lat[:, 0] > 0
        per[budget] = (iou(occ, gt).cpu().numpy(), bfscore(occ, gt).cpu().numpy())
        out[budget] = [round(float(per[budget][0].mean()), 3), round(float(per[budget][1].mean()), 3)]
    # unconditional-ish check: does the sample depend on the image? shuffled cond
    lat = gen.sample(cond.roll(1, 0), StageSampler(25, 3.0, **shared), seed=seeds)["flow"]
    out["shuf_bf"] = round(float(bfscore(lat[:, 0] > 0, gt).mean()), 3)
    dh = per["high"][1] - per["low"][1]
    out["gap_bf"] = round(float(dh.mean()), 3)
    out["gap_bf_se"] = round(float(dh.std() / np.sqrt(len(dh))), 3)
    out["share_high_better"] = round(float((dh > 0).mean()), 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    configs = json.loads(sys.argv[1])
    for c in configs:
        run(c["name"], c.get("o", {}), c.get("steps", 600))
