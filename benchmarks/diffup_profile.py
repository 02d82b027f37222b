"""Profile: where one DiffUp episode spends its time, against the prototype method, in one process on one
thread (results: docs/bench/diffup_vs_prototype.md, "Time").

    python benchmarks/diffup_profile.py --episodes 30 --shots 1 --method-arg steps=3

For each Weizmann-horse episode (query horse i+1, supports the next images) every stage runs once with an
empty feature cache first, so encoding is counted as a run without cache reuse would pay it: the
prototype method (encoding at its 473 px, matching), then DiffUp's stages one by one (encoding at its
inference size, the prototype prior on those features, the prior check, BAFT, UAPF and the UQDD sampler,
each DDIM step timed). Medians over the episodes are printed as a Markdown table, with each stage's
share of the prototype method's episode time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(os.environ.get("FSDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> int:
    """Time the stages and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fsdiff.api import build_segmenter, open_source
    from fsdiff.data.sampler import EpisodeSpec, build_episode
    from fsdiff.methods.diffup.gate import prior_check
    from fsdiff.methods.diffup.schedule import make_generator

    extra = {}
    for kv in args.method_arg:
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    source = open_source("folder", DATA / "weizmann-horse")
    keys = source.images_of_class(0)
    proto = build_segmenter("prototype")
    d = build_segmenter("diffup", benchmark=dict(dataset="folder"), **extra)
    cfg = d.config
    eps = [build_episode(source, EpisodeSpec(str(i), 0, (keys[i],), tuple(keys[i + 1:i + 1 + args.shots])))
           for i in range(0, 2 * args.episodes, 2)]
    proto.predict(eps[0]), d.predict(eps[0])  # first-call costs
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t = time.perf_counter()
        times.setdefault(name, []).append(1000 * (t - t0))
        return t

    load = [os.getloadavg()[0]]
    for ep in eps:
        images = [s.image for s in ep.shots] + [q.image for q in ep.queries]
        proto.cache.clear()
        t = time.perf_counter()
        proto.predict(ep)
        t = tick("prototype: episode (encoding included)", t)
        proto.cache.features(proto.encoder, images, proto.size)
        t = tick("prototype: encoding (cached now: the lookup only)", t)
        proto.cache.clear()
        proto.cache.features(proto.encoder, images, proto.size)
        t = tick("prototype: encoding", t)
        d.cache.clear()
        t = time.perf_counter()
        d._features(images)
        t = tick("diffup: encoding", t)
        probs = d.prior.predict(ep)
        t = tick("diffup: prototype prior (features cached)", t)
        prior_check(d.prior, ep, 0, probs[0])
        t = tick("diffup: prior check", t)
        item = d.episode_priors(ep)[0]
        t = tick("diffup: BAFT priors (features cached)", t)
        ids = torch.tensor([[cfg.type_id(x) for x in item["types"]]])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=d.bf16):
            fused = d.uapf(item["priors"][None], ids, torch.ones_like(ids, dtype=torch.bool))
            t = tick("diffup: UAPF", t)
            d.uqdd.sample(fused.mu.float(), fused.var.float(), item["query_rgb"][None], item["query_extra"][None],
                          steps=1, generator=make_generator(0), size=(d.mask_size, d.mask_size),
                          annotation_types=[list(item["types"])])
            t = tick("diffup: UQDD, one DDIM step", t)
            d.uqdd.sample(fused.mu.float(), fused.var.float(), item["query_rgb"][None], item["query_extra"][None],
                          steps=d.steps, generator=make_generator(0), size=(d.mask_size, d.mask_size),
                          annotation_types=[list(item["types"])])
            t = tick(f"diffup: UQDD, {d.steps} DDIM steps", t)
        d.cache.clear()
        t = time.perf_counter()
        d.predict(ep)
        t = tick("diffup: episode, gated as configured (encoding included)", t)
        d.cache.clear()
        d.prior_gate, gate = None, d.prior_gate
        t = time.perf_counter()
        d.predict(ep)
        t = tick("diffup: episode, decoder always (encoding included)", t)
        d.prior_gate = gate
        load.append(os.getloadavg()[0])
    ref = statistics.median(times["prototype: episode (encoding included)"])
    print(f"{len(eps)} episodes, {args.shots}-shot, DiffUp input {d.input_size}, {d.steps} steps, prior_gate "
          f"{d.prior_gate}; load average {min(load):.1f}-{max(load):.1f}; medians\n")
    print("| stage | ms (median) | x prototype episode |")
    print("|---|---|---|")
    for name, vals in times.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.1f} | {med / ref:.2f} |")
    print(f"\nmean over episodes of the per-episode ratio DiffUp (decoder always) / prototype: "
          f"{np.mean(np.array(times['diffup: episode, decoder always (encoding included)']) / np.array(times['prototype: episode (encoding included)'])):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
