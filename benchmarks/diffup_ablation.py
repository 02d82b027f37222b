"""Diagnosis: where DiffUp loses to the prototype prior it starts from, stage by stage, on identical episodes
(results: docs/bench/diffup_vs_prototype.md, "Diagnosis").

    python benchmarks/diffup_ablation.py --dataset horses --part tune --shots 1 --input-size 448
    python benchmarks/diffup_ablation.py --dataset coco --fold 0 --split trn --episodes 300 --input-size 473

Per query it scores, from one set of features (the shipped checkpoint, each stage fed by the previous one):

* ``prototype 473`` / ``prototype <size>``: the prototype method at its own 473 px and at DiffUp's size;
* ``anchor``: BAFT's anchor, sigmoid of the logit of the mean contrast map of levels 1-2 on the prior grid
  (what an untrained UAPF + UQDD return);
* ``UAPF``: sigmoid of the trained UAPF's fused μ (its learned residual on the anchor);
* ``UQDD s=N``: the decoder's DDIM sample after N steps from t* = 0.3 T (mask supports), and variants:
  ``t*=f`` (start at f T), ``mask M`` (sample an M x M mask), ``anchor μ`` (the anchor instead of UAPF's μ),
  ``fp32`` (no bfloat16 autocast).

Episodes are those of ``benchmarks/diffup_vs_prototype.py`` (horse parts, or coco HSNet seed 0 with classes
that have more images than shots). Printed: mIoU per variant (per-class summed IoU, mean over classes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffup_vs_prototype import HORSES, horse_specs  # noqa: E402

VARIANTS = {  # name -> sampler settings (steps 0 = no decoder)
    "UQDD s=1": dict(steps=1), "UQDD s=3": dict(steps=3), "UQDD s=10": dict(steps=10),
    "UQDD s=1, t*=0.02": dict(steps=1, tfrac=0.02), "UQDD s=1, t*=0.1": dict(steps=1, tfrac=0.1),
    "UQDD s=1, t*=0.5": dict(steps=1, tfrac=0.5), "UQDD s=1, mask 96": dict(steps=1, mask=96),
    "UQDD s=1, mask 128": dict(steps=1, mask=128), "UQDD s=1, anchor μ": dict(steps=1, mu="anchor"),
    "UQDD s=10, fp32": dict(steps=10, fp32=True),
}


def main() -> int:
    """Score every stage and variant; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["horses", "coco"], required=True)
    ap.add_argument("--part", choices=["tune", "test"], default="tune")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--split", choices=["trn"], default=None)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--input-size", type=int, default=448)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fsdiff.api import open_source
    from fsdiff.data.sampler import build_episode, sample_episodes
    from fsdiff.features import FeatureCache
    from fsdiff.methods.diffup.schedule import make_generator
    from fsdiff.methods.diffup.segmenter import DiffUpSegmenter
    from fsdiff.methods.diffup.shipped import shipped_checkpoint
    from fsdiff.methods.diffup.uapf import anchor_logit
    from fsdiff.methods.prototype import PrototypeSegmenter
    from fsdiff.metrics import intersection_and_union

    if args.dataset == "horses":
        source = open_source("folder", HORSES / "weizmann-horse")
        specs = horse_specs(source, args.part, args.shots)[: args.episodes]
        ckpt = shipped_checkpoint()
    else:
        source = open_source("coco", HORSES / "coco-mini", fold=args.fold, split=args.split)
        source.classes = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > args.shots]
        specs = sample_episodes(source, "hsnet", args.episodes or 300, args.shots, 0)
        ckpt = shipped_checkpoint("coco", args.fold)
    cache = FeatureCache()
    size = args.input_size
    d = DiffUpSegmenter(ckpt, cache=cache, input_size=size, prior_gate=False)
    cfg, T = d.config, d.config.num_train_timesteps
    protos = {"prototype 473": PrototypeSegmenter(d.encoder, cache=cache)}
    if size != 473:
        protos[f"prototype {size}"] = PrototypeSegmenter(d.encoder, size=size, cache=cache)
    names = list(protos) + ["anchor", "UAPF"] + args.variants
    acc = {n: {} for n in names}

    def add(name: str, prob: torch.Tensor | np.ndarray, gt: np.ndarray, cls: int) -> None:
        p = torch.as_tensor(np.asarray(prob, np.float32))
        if tuple(p.shape) != gt.shape:
            p = F.interpolate(p[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
        i, u = intersection_and_union(p.numpy() > 0.5, gt)
        a = acc[name].setdefault(cls, [0, 0])
        a[0] += int(i[1])
        a[1] += int(u[1])

    t0 = time.time()
    for spec in specs:
        ep = build_episode(source, spec)
        gt, cls = ep.queries[0].gt, int(ep.class_id)
        for n, p in protos.items():
            add(n, p.predict(ep)[0], gt, cls)
        item = d.episode_priors(ep)[0]
        pri = item["priors"]
        anchor = anchor_logit(pri[:, cfg.anchor_channels])[:1]
        add("anchor", torch.sigmoid(anchor)[0, 0], gt, cls)
        ids = torch.tensor([[cfg.type_id(t) for t in item["types"]]])
        for name in args.variants:
            v = VARIANTS[name]
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=d.bf16 and not v.get("fp32")):
                fused = d.uapf(pri[None], ids, torch.ones_like(ids, dtype=torch.bool))
                mu, var = fused.mu.float(), fused.var.float()
                if name == args.variants[0]:
                    add("UAPF", torch.sigmoid(mu)[0, 0], gt, cls)
                if v.get("mu") == "anchor":
                    mu = anchor.float()
                ms = v.get("mask", d.mask_size)
                kw = dict(t_start=max(1, round(v["tfrac"] * T))) if "tfrac" in v else dict(annotation_types=[list(item["types"])])
                s = d.uqdd.sample(mu, var, item["query_rgb"][None], item["query_extra"][None], steps=v["steps"],
                                  generator=make_generator(0), size=(ms, ms), **kw)
            add(name, s.prob[0, 0].float(), gt, cls)
    where = args.part if args.dataset == "horses" else f"fold {args.fold} {args.split or 'val'}"
    print(f"{args.dataset} {where}, "
          f"{args.shots}-shot, {len(specs)} episodes, DiffUp input {size} (priors {d.prior_size}, mask {d.mask_size}); "
          f"{time.time() - t0:.0f} s\n")
    print("| stage | mIoU |\n|---|---|")
    for n in names:
        if acc[n]:
            print(f"| {n} | {100 * np.mean([i / max(u, 1) for i, u in acc[n].values()]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
