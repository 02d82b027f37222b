"""Benchmark: what DiffSeg costs at Kandinsky-2.2 size on a CPU, and a training demonstration on real data.

Three sub-commands (results and the machine they ran on: docs/bench/diffseg_cost.md):

``cost``  Builds a Kandinsky-2.2-SIZE decoder UNet, MoVQ and CLIP ViT-bigG/14 vision tower with RANDOM weights
          from the public configs' values (so the FLOPs and memory of every pass are those of the real models;
          the weights are not downloaded) directly in bf16, and measures at ``--size`` (512 -> 64x64 latent):

          (a) a plain UNet forward (the default processors, ``AttnAddedKVProcessor2_0``);
          (b) the same forward inside :class:`fsdiff.diffusion.attention.AttentionCapture` at 8/16/32, plus
              the Eq. (11) read-out, and the ratio (b)/(a);
          (c) a whole ``diffseg-prior`` episode (1 shot, 1 query: CLIP embed + MoVQ encodes + the UNet pass with
              capture and early exit + M_a) through ``DiffSegPriorSegmenter.predict``;
          (d) a whole ``diffseg`` episode (also HED edges, SCM, PAM and the MoVQ decode) through
              ``DiffSegSegmenter.predict`` with freshly initialised PAM/SCM;

          each after one warm-up, ``--reps`` timed repetitions, with the peak resident memory during the call
          (a 10 ms psutil sampler) and ``os.getloadavg()`` before and after.

``attention``  The 22 attention layers of the Kandinsky 2.2 UNet alone (real sizes and module names, bf16):
          default SDPA processors vs the capture processors, and the Eq. (11) read-out, timed interleaved; this
          isolates the capture overhead from the convolutions (and from the shared machine's noise).

``train-demo``  Trains DiffSeg (PAM + SCM; the paper's SGD recipe through ``train_diffseg``) on coco-mini's
          fold-0 train split with the TINY Kandinsky stand-ins (``build_tiny_kandinsky``) on the CPU, and reports
          the loss curve (first / last 10-step means) plus the loss of fixed probe batches of base (train split)
          and novel (val split) classes before and after training.

    python benchmarks/diffseg_cost.py cost --size 512 --threads 2 --reps 2 --json /tmp/diffseg_cost.json
    python benchmarks/diffseg_cost.py cost --size 512 --threads 2 --reps 3 --only a,b --interleave
    python benchmarks/diffseg_cost.py attention --size 512 --threads 2 --reps 5
    python benchmarks/diffseg_cost.py train-demo --steps 200 --size 64 --threads 1 --out /tmp/diffseg-demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"

# Public configs (kandinsky-community/kandinsky-2-2-decoder unet/config.json and movq/config.json, as in diffusers'
# scripts/convert_kandinsky_to_diffusers.py with the 2.2 image conditioning; kandinsky-2-2-prior
# image_encoder/config.json = CLIP ViT-bigG/14 vision tower). Every other key is tiny.py's (same as public).
K22_UNET_OVERRIDES: dict[str, Any] = dict(
    attention_head_dim=64, block_out_channels=(384, 768, 1152, 1536), cross_attention_dim=768,
    encoder_hid_dim=1280, layers_per_block=3, norm_num_groups=32,
)
K22_MOVQ_OVERRIDES: dict[str, Any] = dict(
    num_vq_embeddings=16384, block_out_channels=(128, 256, 256, 512), layers_per_block=2, norm_num_groups=32,
)
BIGG_VISION: dict[str, Any] = dict(
    hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5,
)


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measure(fn: Callable[[], Any], reps: int, label: str) -> dict[str, Any]:
    """One warm-up, then ``reps`` timed calls: seconds (each, mean, min), peak RSS and load averages."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with PeakRSS() as warm:
        fn()
    warm_s = time.perf_counter() - t0
    times, peaks, starts = [], [], []
    for _ in range(reps):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
        starts.append(mem.start)
    out = {
        "label": label, "warmup_s": round(warm_s, 3), "seconds": [round(t, 3) for t in times],
        "mean_s": round(statistics.mean(times), 3) if times else None, "min_s": round(min(times), 3) if times else None,
        "peak_rss_gb": round(max(peaks + [warm.peak]) / 2**30, 3),
        "rss_before_gb": round(min(starts + [warm.start]) / 2**30, 3),
        "peak_increase_gb": round((max(peaks + [warm.peak]) - min(starts + [warm.start])) / 2**30, 3),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out), flush=True)
    return out


def measure_pairs(plain: Callable[[], Any], captured: Callable[[], Any], reps: int) -> dict[str, Any]:
    """(a) and (b) interleaved: one warm-up each, then ``reps`` pairs a, b; the ratio of every pair."""
    load_before = os.getloadavg()
    plain()
    captured()
    ta, tb, peaks = [], [], []
    for _ in range(reps):
        for fn, into in ((plain, ta), (captured, tb)):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                fn()
                into.append(time.perf_counter() - t0)
            peaks.append(mem.peak)
    ratios = [round(b / a, 3) for a, b in zip(ta, tb)]
    out = {
        "a_unet_plain": {"label": "(a) plain UNet forward (interleaved)", "seconds": [round(t, 3) for t in ta],
                         "mean_s": round(statistics.mean(ta), 3), "min_s": round(min(ta), 3)},
        "b_unet_capture": {"label": "(b) UNet forward + AttentionCapture 8/16/32 + M_a (interleaved)",
                           "seconds": [round(t, 3) for t in tb], "mean_s": round(statistics.mean(tb), 3),
                           "min_s": round(min(tb), 3)},
        "ab_pairs": {"ratios": ratios, "ratio_median": round(statistics.median(ratios), 3),
                     "peak_rss_gb": round(max(peaks) / 2**30, 3), "loadavg_before": [round(x, 2) for x in load_before],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(out), flush=True)
    return out


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Kandinsky-2.2-size parts with random weights
# ----------------------------------------------------------------------------------------------------------------


def build_k22_parts(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """UNet + MoVQ + CLIP ViT-bigG/14 vision tower of Kandinsky 2.2's sizes, random weights, created in ``dtype``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fsdiff.diffusion.loading import KandinskyParts, _clip_image_processor_class, freeze
    from fsdiff.diffusion.tiny import TINY_KANDINSKY_SCHEDULER, TINY_KANDINSKY_UNET, TINY_MOVQ

    torch.manual_seed(seed)
    with default_dtype(dtype):  # parameters are allocated and initialised in bf16: no fp32 copy ever exists
        unet = UNet2DConditionModel(**{**TINY_KANDINSKY_UNET, **K22_UNET_OVERRIDES})
        movq = VQModel(**{**TINY_MOVQ, **K22_MOVQ_OVERRIDES})
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**BIGG_VISION))
    for m in (unet, movq, encoder):
        if any(t.is_floating_point() and t.dtype != dtype for t in [*m.parameters(), *m.buffers()]):
            m.to(dtype)
        freeze(m)
    side = BIGG_VISION["image_size"]
    processor = _clip_image_processor_class()(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True,
        do_normalize=True, do_resize=True, do_rescale=True, do_convert_rgb=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return KandinskyParts(unet=unet, movq=movq, scheduler=DDPMScheduler(**TINY_KANDINSKY_SCHEDULER),
                          image_encoder=encoder, image_processor=processor, device=torch.device("cpu"), dtype=dtype,
                          prior_source="random ViT-bigG/14 vision tower", decoder_source="random K2.2 UNet + MoVQ")


def synthetic_episode(size: int) -> Any:
    """One 1-shot episode of ``size`` x ``size`` images (content does not change the cost)."""
    from fsdiff.episode import Episode, MaskAnnotation, Query, Shot

    rng = np.random.default_rng(0)

    def image() -> np.ndarray:
        img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 120
        return img

    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return Episode(class_id=1, class_name="square", shots=(Shot(image(), MaskAnnotation(mask), "s0"),),
                   queries=(Query(image(), mask.copy(), "q0"),), episode_id="bench")


def cmd_cost(args: argparse.Namespace) -> dict[str, Any]:
    from fsdiff.diffusion.attention import AttentionCapture
    from fsdiff.methods.diffseg import DiffSegConfig, DiffSegModel
    from fsdiff.methods.diffseg.segmenter import DiffSegPriorSegmenter, DiffSegSegmenter

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "size": args.size, "threads": args.threads,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    cpu_start = time.process_time()
    t0 = time.perf_counter()
    parts = build_k22_parts(torch.bfloat16, seed=0)
    unet = parts.unet
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = {"unet": n_params(unet), "movq": n_params(parts.movq),
                        "clip_vision": n_params(parts.image_encoder)}
    result["rss_after_build_gb"] = round(rss() / 2**30, 3)
    result["unet_processors"] = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    print(json.dumps({k: result[k] for k in ("build_s", "params", "rss_after_build_gb", "unet_processors")}),
          flush=True)

    lat = args.size // parts.movq_scale_factor
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, lat, lat, generator=g).to(torch.bfloat16)
    emb = torch.randn(1, parts.embed_dim, generator=g).to(torch.bfloat16)
    t = torch.tensor([100])
    cond = {"image_embeds": emb}

    def plain() -> None:
        with torch.no_grad():
            unet(sample=sample, timestep=t, encoder_hidden_states=None, added_cond_kwargs=cond)

    def captured() -> None:
        with torch.no_grad():
            with AttentionCapture(unet, resolutions=(8, 16, 32), common_size=32, latent_size=lat) as cap:
                unet(sample=sample, timestep=t, encoder_hidden_states=None, added_cond_kwargs=cond)
            cap.prior(size=lat)

    runs: dict[str, Any] = {}
    steps = args.only.split(",") if args.only else ["a", "b", "c", "d"]
    if "a" in steps and "b" in steps and args.interleave:
        # warm both up, then a b a b ...: a drift of the shared machine's load hits both alike
        runs.update(measure_pairs(plain, captured, args.reps))
        result["capture_ratio_pairs"] = runs["ab_pairs"]["ratios"]
        result["capture_ratio_median"] = runs["ab_pairs"]["ratio_median"]
    else:
        if "a" in steps:
            runs["a_unet_plain"] = measure(plain, args.reps, "(a) plain UNet forward")
        if "b" in steps:
            runs["b_unet_capture"] = measure(captured, args.reps, "(b) UNet forward + AttentionCapture 8/16/32 + M_a")
    if "a_unet_plain" in runs and "b_unet_capture" in runs:
        a, b = runs["a_unet_plain"], runs["b_unet_capture"]
        result["capture_ratio_mean"] = round(b["mean_s"] / a["mean_s"], 3)
        result["capture_ratio_min"] = round(b["min_s"] / a["min_s"], 3)
    if "c" in steps or "d" in steps:
        cfg = DiffSegConfig(input_size=args.size, dtype="bf16", device="cpu", prior_model="(random)",
                            decoder_model="(random)")
        model = DiffSegModel(parts, cfg).eval()
        episode = synthetic_episode(args.size)
        if "c" in steps:
            seg = DiffSegPriorSegmenter(model=model)
            runs["c_episode_diffseg_prior"] = measure(lambda: seg.predict(episode), args.reps,
                                                      "(c) diffseg-prior episode (1 shot, 1 query)")
        if "d" in steps:
            full = DiffSegSegmenter(model=model)
            runs["d_episode_diffseg"] = measure(lambda: full.predict(episode), args.reps,
                                                "(d) diffseg episode (1 shot, 1 query)")
    result["runs"] = runs
    result["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


# ----------------------------------------------------------------------------------------------------------------
# attention-only micro-benchmark: where the capture overhead comes from
# ----------------------------------------------------------------------------------------------------------------


class AttentionStack(torch.nn.Module):
    """The 22 attention layers of the Kandinsky 2.2 decoder UNet (real sizes and module names), nothing else.

    ``forward(sample, timestep, encoder_hidden_states)`` runs each layer once on a random hidden state of its
    level, so that :class:`AttentionCapture` (which hooks the module it is given) sees the same layers, grids and
    token counts as in the UNet. Levels for a ``latent`` x ``latent`` latent: down 1-3 (3 layers each), mid (1),
    up 0-2 (4 layers each).
    """

    def __init__(self, latent: int = 64, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0

        widths = K22_UNET_OVERRIDES["block_out_channels"]
        head = K22_UNET_OVERRIDES["attention_head_dim"]
        cross = K22_UNET_OVERRIDES["cross_attention_dim"]
        layers = K22_UNET_OVERRIDES["layers_per_block"]

        def attn(ch: int) -> Any:
            return Attention(query_dim=ch, cross_attention_dim=ch, heads=ch // head, dim_head=head,
                             added_kv_proj_dim=cross, norm_num_groups=32, bias=True, upcast_softmax=True,
                             processor=AttnAddedKVProcessor2_0())

        def block(ch: int, n: int) -> torch.nn.Module:
            b = torch.nn.Module()
            b.attentions = torch.nn.ModuleList([attn(ch) for _ in range(n)])
            return b

        with default_dtype(dtype):
            self.down_blocks = torch.nn.ModuleList([torch.nn.Module()] + [block(widths[i], layers) for i in (1, 2, 3)])
            self.mid_block = block(widths[3], 1)
            self.up_blocks = torch.nn.ModuleList([block(widths[3 - i], layers + 1) for i in (0, 1, 2)]
                                                 + [torch.nn.Module()])
        self.plan: list[tuple[Any, int, int]] = []  # (module, channels, side)
        for i in (1, 2, 3):
            self.plan += [(a, widths[i], latent >> i) for a in self.down_blocks[i].attentions]
        self.plan += [(a, widths[3], latent >> 3) for a in self.mid_block.attentions]
        for i in (0, 1, 2):
            self.plan += [(a, widths[3 - i], latent >> (3 - i)) for a in self.up_blocks[i].attentions]
        g = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(1, ch, side, side, generator=g).to(dtype) for _, ch, side in self.plan]

    def forward(self, sample: torch.Tensor, timestep: Any = None, encoder_hidden_states: Any = None) -> None:
        for (module, _, _), x in zip(self.plan, self.inputs):
            module(x, encoder_hidden_states=encoder_hidden_states)


def cmd_attention(args: argparse.Namespace) -> dict[str, Any]:
    """Time the 22 attention layers alone: default SDPA processors vs the capture processors (+ read-out)."""
    from fsdiff.diffusion.attention import AttentionCapture

    torch.set_num_threads(args.threads)
    lat = args.size // 8
    torch.manual_seed(0)
    stack = AttentionStack(lat).eval().requires_grad_(False)
    sample = torch.zeros(1, 4, lat, lat, dtype=torch.bfloat16)
    enc = torch.randn(1, 32, K22_UNET_OVERRIDES["cross_attention_dim"]).to(torch.bfloat16)  # 32 image tokens

    def plain() -> None:
        with torch.no_grad():
            stack(sample, 100, enc)

    def capture_only() -> None:
        with torch.no_grad():
            with AttentionCapture(stack, resolutions=(8, 16, 32), common_size=32, latent_size=lat):
                stack(sample, 100, enc)

    def capture_prior() -> None:
        with torch.no_grad():
            with AttentionCapture(stack, resolutions=(8, 16, 32), common_size=32, latent_size=lat) as cap:
                stack(sample, 100, enc)
            cap.prior(size=lat)

    cap = AttentionCapture(stack, resolutions=(8, 16, 32), common_size=32, latent_size=lat)
    with torch.no_grad():
        with cap:
            stack(sample, 100, enc)
    t0 = time.perf_counter()
    for _ in range(3):
        cap.prior(size=lat)
    readout = (time.perf_counter() - t0) / 3

    # interleave the variants (A B C A B C ...) so that a change of the machine's load hits all of them alike
    fns = {"plain_sdpa": plain, "capture": capture_only, "capture_plus_prior": capture_prior}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = {"layers": len(stack.plan), "threads": args.threads, "size": args.size,
           "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
           "min_s": {k: round(min(v), 4) for k, v in times.items()}, "readout_s": round(readout, 4),
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    out["extra_s_median"] = round(out["median_s"]["capture_plus_prior"] - out["median_s"]["plain_sdpa"], 4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# training demonstration
# ----------------------------------------------------------------------------------------------------------------


def cmd_train_demo(args: argparse.Namespace) -> dict[str, Any]:
    from fsdiff.data import build_source
    from fsdiff.diffusion.loading import load_kandinsky
    from fsdiff.diffusion.tiny import build_tiny_kandinsky
    from fsdiff.methods.diffseg import DiffSegConfig
    from fsdiff.methods.diffseg.training import DiffSegTrainable, steps_per_epoch, train_diffseg

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tiny = build_tiny_kandinsky(out / "tiny-kandinsky", seed=0)
    parts = load_kandinsky(tiny.prior, tiny.decoder, device="cpu", dtype=args.dtype)
    cfg = DiffSegConfig(prior_model=str(tiny.prior), decoder_model=str(tiny.decoder), input_size=args.size,
                        dtype=args.dtype, device="cpu")
    train_src = build_source("coco", root=args.data, fold=args.fold, split="trn")
    val_src = build_source("coco", root=args.data, fold=args.fold, split="val")

    def probe_loss(trainable: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        with torch.no_grad():
            outs = [trainable.loss(b) for b in batches]
        return {k: round(float(np.mean([float(o[k]) for o in outs])), 5) for k in outs[0]}

    # fixed probe batches (4 x batch 4 episodes) of base and novel classes, drawn once with their own seeds
    before_model = DiffSegTrainable(train_src, cfg, parts=parts, seed=args.seed)
    novel = DiffSegTrainable(val_src, cfg, parts=parts, seed=args.seed)
    probes_base = [before_model.make_batch(0, np.random.default_rng(1000 + i), 4) for i in range(4)]
    probes_novel = [novel.make_batch(0, np.random.default_rng(2000 + i), 4) for i in range(4)]
    before = {"base": probe_loss(before_model, probes_base), "novel": probe_loss(before_model, probes_novel)}

    def zero_prior_loss(batches: list[dict[str, torch.Tensor]]) -> float:
        """loss_prior of an all-zero M_a (the 'everything is background' answer), as DiffSegModel.loss weighs it."""
        side = cfg.prior_size or args.size // parts.movq_scale_factor
        vals = []
        for b in batches:
            valid = b["query_valid"]
            yv = torch.nn.functional.interpolate(b["query_mask"] * valid, size=(side, side), mode="area")
            vv = torch.nn.functional.interpolate(valid, size=(side, side), mode="area")
            target = yv / vv.clamp_min(1e-6)
            vals.append(float((vv * target ** 2).sum() / vv.sum().clamp_min(1e-6)))
        return round(float(np.mean(vals)), 5)

    zero = {"base": zero_prior_loss(probes_base), "novel": zero_prior_loss(probes_novel)}

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    res = train_diffseg(train_src, out / "run", config=cfg, parts=parts, seed=args.seed, steps=args.steps,
                        batch_size=args.batch_size, save_every=args.save_every, log_every=1, progress=False,
                        num_threads=args.threads)
    wall = time.perf_counter() - t0
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    losses = [r["loss"] for r in log]

    # reload the final checkpoint into a fresh trainable and score the same probes
    after_model = DiffSegTrainable(train_src, cfg, parts=parts, seed=args.seed + 1)
    after_model.model.load_trainable(res.final_dir)
    after = {"base": probe_loss(after_model, probes_base), "novel": probe_loss(after_model, probes_novel)}
    state = json.loads(sorted(out.glob("run/checkpoint-*/trainer_state.json"))[-1].read_text())["settings"]
    n = min(10, len(losses))
    summary = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "steps": res.steps,
        "batch_size": args.batch_size, "input_size": args.size, "dtype": args.dtype, "threads": args.threads,
        "steps_per_epoch": steps_per_epoch(train_src, args.batch_size), "trainer_settings": state,
        "train_classes": len(before_model.classes), "train_pairs": len(train_src.query_items()),
        "first10_mean": round(float(np.mean(losses[:n])), 5), "last10_mean": round(float(np.mean(losses[-n:])), 5),
        "first10_parts": {k: round(float(np.mean([r[k] for r in log[:n]])), 5) for k in ("loss_prior", "loss_latent")},
        "last10_parts": {k: round(float(np.mean([r[k] for r in log[-n:]])), 5) for k in ("loss_prior", "loss_latent")},
        "curve_20step_means": [round(float(np.mean(losses[i:i + 20])), 4) for i in range(0, len(losses), 20)],
        "probe_before": before, "probe_after": after, "probe_loss_prior_of_all_zero_prior": zero,
        "wall_s": round(wall, 1),
        "sec_per_step": round(res.seconds_per_step, 3), "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "final_dir": str(res.final_dir),
        "final_files": sorted(p.relative_to(res.final_dir).as_posix() for p in res.final_dir.rglob("*") if p.is_file()),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost", help="seconds and memory at Kandinsky-2.2 size (random weights, bf16, CPU)")
    c.add_argument("--size", type=int, default=512)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--reps", type=int, default=2)
    c.add_argument("--only", default="", help="comma list of a,b,c,d (default: all)")
    c.add_argument("--interleave", action="store_true", help="time (a) and (b) as alternating pairs")
    c.add_argument("--json", default=None, help="also write the results to this file")
    a = sub.add_parser("attention", help="the 22 attention layers alone: SDPA vs capture processors")
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--reps", type=int, default=5)
    a.add_argument("--json", default=None)
    d = sub.add_parser("train-demo", help="train DiffSeg with tiny Kandinsky on coco-mini (CPU)")
    d.add_argument("--data", default=str(DEFAULT_DATA))
    d.add_argument("--fold", type=int, default=0)
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--dtype", default="bf16")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--save-every", type=int, default=100)
    d.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    d.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.command == "cost":
        result = cmd_cost(args)
    elif args.command == "attention":
        result = cmd_attention(args)
    else:
        args.out = args.out or tempfile.mkdtemp(prefix="diffseg-demo-")
        result = cmd_train_demo(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
