"""Benchmark: DifFSS generation cost on this CPU, cache hit rates, and the drift-score distribution.

Three parts, each optional (``--parts cost cache drift``):

``cost``
    SD 1.5-SIZE models with RANDOM weights, built directly in bfloat16 (no download exists here): the public
    SD 1.5 UNet config (860 M parameters), the public SD VAE config, the public SD 1.5 CLIPTextModel config
    (768 wide, 12 layers) and ``ControlNetModel.from_unet`` of that UNet (the public sd-controlnet layout).
    They are assembled exactly as :mod:`fsdiff.augment.generate` does (``StableDiffusionParts`` ->
    ``ControlNetGenerator.from_parts`` -> ``build_pipeline`` -> ``ddim_scheduler``) and one image is generated
    through ``ControlNetGenerator.generate`` at 512 x 512 with the DifFSS settings (guidance 9, so the UNet and
    ControlNet run on a classifier-free-guidance batch of 2; eta 0; control scale 1; seg control), but with only
    ``--timed-steps`` DDIM steps (default 3). Forward hooks on the text encoder, ControlNet, UNet and VAE decoder
    time every phase, and the 20-step cost is EXTRAPOLATED as ``wall - sum(timed steps) + 20 x median(step)``.
    ``--timed-steps 20`` measures a full image instead. Peak memory is the process RSS, sampled every 20 ms by
    a thread (psutil) and cross-checked with ``getrusage`` ``ru_maxrss``. The tokenizer is the tiny test CLIP
    tokenizer (the real vocabulary cannot be downloaded here); its cost is negligible either way.
``cache``
    Tiny random SD + ControlNet (:mod:`fsdiff.diffusion.tiny`), ``pregenerate`` on ``--supports`` real
    weizmann-horse supports (seg:``--per-support``) into a fresh cache (pass 1), then the identical run again
    with a new lazy generator (pass 2: should be 100 % hits, loading no model). Each pass gets its own
    ``GenerationCache`` object, so ``cache.stats()`` counts that pass only.
``drift``
    Pass 3 repeats the run with ``DriftFilter('segment', max_retries=1)`` (prototype segmenter, real support
    as the 1-shot support, IoU with the reused mask): first attempts are cache hits, retries (new seeds) are
    misses that land in the cache too. The report's ``summary()`` (distribution of the first-attempt scores)
    is printed. With random tiny models the generated images are noise, so these scores are meaningless as a
    quality measure: the point is the reporting plumbing.

The machine is shared: ``os.getloadavg()`` is recorded before and after each part; read timings with it.

    PYTHONPATH=src python benchmarks/diffss_cost.py --out runs/diffss_cost.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann-horse"

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
"""runwayml/stable-diffusion-v1-5 unet/config.json."""

SD_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
"""runwayml/stable-diffusion-v1-5 vae/config.json."""

SD15_TEXT: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
"""runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14 text tower)."""

SD15_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}
"""runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM; the generator turns it into ldm DDIM)."""


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared with other jobs)."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import psutil

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
        "logical_cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "ram_gib": gib(psutil.virtual_memory().total), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "argv": sys.argv,
    }


# ----------------------------------------------------------------------------------------------
# (1) seconds and memory per image, SD 1.5-size models, bf16, 512 px
# ----------------------------------------------------------------------------------------------


def build_sd15_size_parts(dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any, dict[str, Any]]:
    """(StableDiffusionParts, ControlNetModel, info): public SD 1.5 configs, random weights, built in ``dtype``."""
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fsdiff.diffusion.loading import StableDiffusionParts, freeze
    from fsdiff.diffusion.tiny import tiny_clip_tokenizer

    info: dict[str, Any] = {"rss_start_gib": gib(rss_bytes())}
    t0 = time.perf_counter()
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16: no fp32 copy, RAM ~ 2 bytes/parameter
    try:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        controlnet = ControlNetModel.from_unet(unet)  # public layout: conditioning channels (16, 32, 96, 256)
    finally:
        torch.set_default_dtype(before)
    mods = {"unet": unet, "controlnet": controlnet, "vae": vae, "text_encoder": text_encoder}
    for name, m in mods.items():
        if any(p.dtype != dtype for p in m.parameters()):
            m.to(dtype=dtype)
        freeze(m)
        info[f"{name}_params_m"] = round(n_params(m) / 1e6, 1)
        info[f"{name}_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in m.parameters()})
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    info["rss_after_build_gib"] = gib(rss_bytes())
    parts = StableDiffusionParts(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), device=torch.device("cpu"), dtype=dtype,
        source="random-init:sd1.5-size", pipeline_class="StableDiffusionPipeline",
    )
    return parts, controlnet, info


class PhaseTimer:
    """Forward pre/post hooks recording (module, start, end) for every call of the watched modules."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.shapes: dict[str, list[list[int]]] = {}
        self._open: dict[str, float] = {}
        self._handles = []
        for name, mod in modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(_mod: Any, args: tuple) -> None:
            if args and hasattr(args[0], "shape"):
                self.shapes.setdefault(name, []).append(list(args[0].shape))
            self._open[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(*_: Any) -> None:
            self.events.append((name, self._open.pop(name), time.perf_counter()))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def starts(self, name: str) -> list[float]:
        return [s for n, s, _ in self.events if n == name]

    def durations(self, name: str) -> list[float]:
        return [e - s for n, s, e in self.events if n == name]


def support_512(data: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """A real weizmann-horse support, centre-cropped to a square and resized to 512 x 512 (image, 0/1 mask)."""
    import cv2

    from fsdiff.io import read_image, read_mask

    names = sorted(p.stem for p in (data / "images").glob("*.jpg"))
    if not names:
        raise SystemExit(f"no weizmann-horse images under {data}/images (set --data)")
    img = read_image(data / "images" / f"{names[0]}.jpg")
    mask = read_mask(data / "masks" / f"{names[0]}.png")
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    img = cv2.resize(np.ascontiguousarray(img[y:y + s, x:x + s]), (512, 512), interpolation=cv2.INTER_AREA)
    m = np.asarray(mask)[y:y + s, x:x + s]
    m = cv2.resize((m == 1).astype(np.uint8), (512, 512), interpolation=cv2.INTER_NEAREST)
    return img, m, names[0]


def part_cost(data: Path, timed_steps: int, target_steps: int) -> dict[str, Any]:
    """One 512 x 512 image through ControlNetGenerator.generate with SD 1.5-size random models in bf16."""
    from fsdiff.augment.generate import ControlNetGenerator, GenerationConfig

    out: dict[str, Any] = {"loadavg_before": loadavg()}
    img, mask, name = support_512(data)
    sd, controlnet, info = build_sd15_size_parts(torch.bfloat16)
    out["models"] = info
    cfg = GenerationConfig(steps=timed_steps, batch_size=1, seed=0)  # guidance 9, eta 0, control 1.0, 512 px
    gen = ControlNetGenerator.from_parts(sd, controlnet, "seg", controlnet_id="random-init:controlnet-sd1.5-size",
                                         config=cfg)
    pipe = gen.pipeline
    out["pipeline"] = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                       "scheduler_config": {k: pipe.scheduler.config[k] for k in
                                            ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample")}}
    timer = PhaseTimer({"text_encoder": sd.text_encoder, "controlnet": controlnet, "unet": sd.unet,
                        "vae_decoder": sd.vae.decoder})
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        items = gen.generate(img, mask, "horse", n=1)
    wall = time.perf_counter() - t0
    timer.remove()
    cn_starts = timer.starts("controlnet")
    dec_start = timer.starts("vae_decoder")[0]
    steps = [b - a for a, b in zip(cn_starts, cn_starts[1:] + [dec_start])]
    per_step = statistics.median(steps)
    fixed = wall - sum(steps)
    out["support"] = {"image": name, "size": list(img.shape[:2]), "generated_size": list(items[0].generated_size)}
    out["timing"] = {
        "timed_steps": timed_steps, "wall_seconds": round(wall, 2), "step_seconds": [round(s, 2) for s in steps],
        "median_step_seconds": round(per_step, 2),
        "controlnet_forward_seconds": [round(s, 2) for s in timer.durations("controlnet")],
        "unet_forward_seconds": [round(s, 2) for s in timer.durations("unet")],
        "text_encoder_seconds": [round(s, 3) for s in timer.durations("text_encoder")],
        "vae_decode_seconds": [round(s, 2) for s in timer.durations("vae_decoder")],
        "fixed_seconds": round(fixed, 2),
        "unet_input_shapes": timer.shapes.get("unet", [])[:1],
        "controlnet_input_shapes": timer.shapes.get("controlnet", [])[:1],
        "target_steps": target_steps,
        "seconds_per_image_at_target_steps": round(fixed + target_steps * per_step, 1),
        "extrapolated": timed_steps != target_steps,
        "formula": f"wall - sum(step_seconds) + {target_steps} x median_step_seconds",
    }
    out["memory"] = {"rss_before_generate_gib": gib(rss0), "peak_rss_during_generate_gib": gib(peak.peak),
                     "ru_maxrss_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    out["loadavg_after"] = loadavg()
    return out


# ----------------------------------------------------------------------------------------------
# (2) cache hit rates and (3) drift scores, tiny random models on real supports
# ----------------------------------------------------------------------------------------------


def part_cache_drift(data: Path, supports: int, per_support: int, resolution: int, steps: int,
                     drift: bool) -> dict[str, Any]:
    """Identical pregenerate passes into one cache (2nd: lazy, expect 100 % hits); 3rd with a drift filter."""
    from fsdiff.augment.cache import GenerationCache
    from fsdiff.augment.drift import DriftFilter
    from fsdiff.augment.generate import GenerationConfig, load_generator
    from fsdiff.augment.pregenerate import check_cache, pregenerate, work_items
    from fsdiff.data.folder import FolderSource
    from fsdiff.diffusion.tiny import build_tiny_controlnet, build_tiny_stable_diffusion

    out: dict[str, Any] = {"loadavg_before": loadavg()}
    source = FolderSource(data, class_name="horse")
    items = work_items(source)[:supports]
    cfg = GenerationConfig(steps=steps, seed=0).replace(resolution=resolution)
    with tempfile.TemporaryDirectory() as tmp:
        sd = build_tiny_stable_diffusion(Path(tmp) / "sd")
        cn = build_tiny_controlnet(Path(tmp) / "cn")
        cache_dir = Path(tmp) / "cache"
        passes = []
        drift_report = None
        plan = [("1: fresh cache", False), ("2: identical re-run (lazy generator)", False)]
        if drift:
            plan.append(("3: re-run with DriftFilter('segment', max_retries=1)", True))
        for label, with_drift in plan:
            cache = GenerationCache(cache_dir)  # a new object per pass: its stats count this pass only
            gen = load_generator("seg", model=sd, controlnet=cn, cache=cache, config=cfg, lazy=True)
            flt = DriftFilter("segment", max_retries=1) if with_drift else None
            t0 = time.perf_counter()
            rep = pregenerate([(it.image_key, it.class_id) for it in items], gen, "seg", per_support, cache=cache,
                              source=source, drift_filter=flt, progress=False)
            passes.append({
                "pass": label, "seconds": round(time.perf_counter() - t0, 2), "items": rep.items_done,
                "failed": len(rep.failed), "images_kept": len(rep.keys), "kept_generated": rep.generated,
                "kept_cached": rep.cached, "pipeline_images": gen.images_generated, "models_loaded": gen.loaded,
                "cache_stats": cache.stats().as_dict(),
            })
            if flt is not None:
                drift_report = flt.report
        out["cache_passes"] = passes
        out["cache_check"] = {k: v for k, v in check_cache(cache_dir).items() if k in ("entries", "ok", "problems")}
    out["setup"] = {"supports": [it.image_key for it in items], "per_support": per_support, "resolution": resolution,
                    "steps": steps, "models": "tiny random SD 1.5-layout + ControlNet (fsdiff.diffusion.tiny)"}
    if drift_report is not None:
        out["drift"] = {"score": drift_report.score, "threshold": drift_report.threshold,
                        "max_retries": drift_report.max_retries, "kept": drift_report.kept,
                        "regenerated": drift_report.regenerated, "dropped": drift_report.dropped,
                        "unscored": drift_report.unscored, "summary": drift_report.summary(),
                        "all_scores": [round(s, 4) for s in drift_report.scores],
                        "note": "random tiny models: generated images are noise, so the scores measure nothing; "
                                "this shows the reporting plumbing only"}
    out["loadavg_after"] = loadavg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FSDIFF_WEIZMANN_HORSE", str(DEFAULT_DATA)))
    ap.add_argument("--parts", nargs="+", default=["cost", "cache", "drift"], choices=["cost", "cache", "drift"])
    ap.add_argument("--timed-steps", type=int, default=3, help="DDIM steps actually run for the cost (default 3)")
    ap.add_argument("--target-steps", type=int, default=20, help="DDIM steps to extrapolate to (DifFSS default 20)")
    ap.add_argument("--supports", type=int, default=8, help="weizmann-horse supports for the cache/drift part")
    ap.add_argument("--per-support", type=int, default=4, help="images per support (DifFSS: 4)")
    ap.add_argument("--tiny-resolution", type=int, default=128)
    ap.add_argument("--tiny-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the JSON here as well")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    result: dict[str, Any] = {"machine": machine(), "note": "shared machine: other jobs were running; see loadavg"}
    t0 = time.perf_counter()
    if "cache" in args.parts or "drift" in args.parts:
        result["cache_drift"] = part_cache_drift(data, args.supports, args.per_support, args.tiny_resolution,
                                                 args.tiny_steps, drift="drift" in args.parts)
        print(json.dumps(result["cache_drift"], indent=2), flush=True)
    if "cost" in args.parts:
        result["cost"] = part_cost(data, args.timed_steps, args.target_steps)
        print(json.dumps(result["cost"], indent=2), flush=True)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
