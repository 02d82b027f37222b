"""The ``fsdiff`` command: ``segment``, ``eval``, ``methods``, ``train``, ``augment``, ``demo`` (each a thin shell
over :mod:`fsdiff.api`).

Bad input prints one ``fsdiff: error: ...`` line (library argument names translated into this command's
flags) and exits with status 2, without a traceback and without partial output files. Ctrl-C or SIGTERM
says what finished and exits with 130.
"""

from __future__ import annotations

import argparse
import glob
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fsdiff import __version__
from fsdiff.errors import FsdiffError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_FLAGS = {
    "class_value": "--class-value", "support_annotation": "--support-annotation", "calibrate_threshold":
    "--calibrate-threshold", "episode_list": "--episode-list", "save_episodes": "--save-episodes",
    "splits_dir": "--splits-dir", "convention": "--split-convention", "input_size": "--input-size",
    "formats": "--format", "queries": "--query", "augment_options": "--augment-*", "num_threads": "--threads",
    "batch_size": "--batch-size", "mixed_precision": "--mixed-precision", "save_every": "--save-every",
}
_KNOWN = ("box", "mask", "scribble", "points", "threshold", "shots", "protocol", "visualize", "split", "out",
          "checkpoint", "encoder", "fold", "ann", "steps", "lr", "warmup", "seed", "prior", "decoder", "config",
          "overwrite", "refine", "support_masks")


def cli_terms(message: str) -> str:
    """A library message with its ``argument=`` names written as this command's flags (``--class-value 300``)."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        return f"{_FLAGS.get(name, '--' + name.replace('_', '-'))} "
    names = "|".join(sorted(set(_FLAGS) | set(_KNOWN), key=len, reverse=True))
    message = re.sub(rf"(?<![\w.\-])({names})=True\b", lambda m: flag(m).rstrip(), message)
    return re.sub(rf"(?<![\w.\-])({names})=", flag, message)


class _SupportAction(argparse.Action):
    """``--support IMG`` starts a new support shot; annotations attach to the latest one."""

    def __call__(self, parser, namespace, values, option_string=None):
        shots = getattr(namespace, "shots", None) or []
        shots.append({"image": values})
        namespace.shots = shots


class _AnnotationAction(argparse.Action):
    """``--mask/--box/--scribble/--points VALUE`` annotates the latest ``--support``."""

    def __call__(self, parser, namespace, values, option_string=None):
        shots = getattr(namespace, "shots", None) or []
        key = option_string.lstrip("-")
        shown = " ".join(values) if isinstance(values, list) else values
        if not shots:
            parser.error(f"{option_string} {shown} comes before any --support IMG; put it right after its support image.")
        last = shots[-1]
        taken = [k for k in ("mask", "box", "scribble", "points") if k in last]
        if taken:
            parser.error(f"support {last['image']} already has --{taken[0]}; give each --support exactly one annotation.")
        last[key] = values
        namespace.shots = shots


def _choices_help(title: str, items: Sequence[tuple[str, str]]) -> str:
    return title + "\n" + "\n".join(f"  {name}: {text}" for name, text in items)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from fsdiff.api import DEFAULT_METHOD
    from fsdiff.features import encoder_summaries
    from fsdiff.methods import METHOD_SPECS, method_names

    p.add_argument("--method", default=DEFAULT_METHOD, choices=method_names(), metavar="NAME",
                   help=_choices_help(f"segmentation method (default {DEFAULT_METHOD}; `fsdiff methods` says which "
                                      "are ready here):", [(n, METHOD_SPECS[n].summary) for n in method_names()]))
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help=_choices_help("frozen image encoder (default: the method's):", encoder_summaries()))
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="trained weights of the method (default: the method's shipped or none)")
    p.add_argument("--threshold", type=float, default=None, help="decision threshold in (0, 1) (default: the method's, 0.5)")
    p.add_argument("--support-masks", default="grabcut", choices=["grabcut", "off"],
                   help="turn box, scribble and click supports into estimated masks first (default grabcut;\n"
                        "off uses the labels as they are)")
    p.add_argument("--refine", default="guided", metavar="SPEC",
                   help="snap probability maps to image edges: guided (default), grabcut (slower, strong with\n"
                        "scribbles) or off; options as guided:radius=24,size=512")
    p.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help="extra method option, repeatable (e.g. self_support=auto for prototype, steps=20 for diffup)",
    )


def _add_augment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DifFSS auxiliary supports")
    g.add_argument("--augment", default=None, metavar="KIND:N", help="add N generated supports per real support (seg, hed or scribble), e.g. hed:4")
    g.add_argument("--augment-cache", default=None, metavar="DIR", help="generation cache folder (default: none; reuse one filled by `fsdiff augment generate`)")
    g.add_argument("--sd-model", default=None, metavar="ID|DIR", help="Stable Diffusion 1.5 model (default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    g.add_argument("--controlnet", default=None, metavar="ID|DIR", help="ControlNet (default: lllyasviel/sd-controlnet-KIND)")
    g.add_argument("--augment-steps", type=int, default=None, metavar="N", help="DDIM steps (default 20)")
    g.add_argument("--augment-resolution", type=int, default=512, metavar="PX", help="short side of the generated images (default 512)")


def _add_source_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    from fsdiff.data import SOURCES

    p.add_argument("--dataset", required=required, choices=SOURCES.names())
    p.add_argument("--root", required=required, metavar="DIR", help="dataset root (coco: the folder holding instances.json and images/, or the image folder when --ann is given)")
    p.add_argument("--ann", default=None, metavar="FILE", help="COCO-format instances json (coco only)")
    p.add_argument("--splits-dir", dest="splits", default=None, metavar="DIR", help="folder with the HSNet split lists (pascal, fss1000; or $FSDIFF_SPLITS)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--split-convention", choices=["interleaved", "contiguous"], default=None, help="COCO-20i fold convention (default interleaved)")


def _source_options(args: argparse.Namespace) -> dict:
    return {"ann": args.ann, "splits_dir": args.splits, "convention": args.split_convention}


def _segment_parser(sub) -> None:
    from fsdiff.output import FORMATS

    p = sub.add_parser("segment", help="segment query images from annotated support images",
                       formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--support", action=_SupportAction, metavar="IMG", help="a support image (repeat for K shots)")
    p.add_argument("--mask", action=_AnnotationAction, metavar="PNG", help="mask of the preceding --support")
    p.add_argument("--box", action=_AnnotationAction, metavar="X0,Y0,X1,Y1", help="box of the preceding --support, in pixels")
    p.add_argument("--scribble", action=_AnnotationAction, metavar="PNG", help="scribble of the preceding --support (1/255 = object, 2/128 = background)")
    p.add_argument("--points", action=_AnnotationAction, nargs="+", metavar="X,Y[,LABEL]",
                   help="clicks on the preceding --support, in pixels; LABEL 1 = object (default), 0 = background")
    p.add_argument("--class-value", default=None, help="label value (or R,G,B colour) of the class in class-index/palette/colour masks")
    p.add_argument("--class-name", default="object", help="name of the class (used by text-aware methods and in COCO output)")
    p.add_argument("--query", nargs="+", required=True, metavar="IMG|DIR|GLOB", help="images to segment: files, folders (their images, sorted) or quoted globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", nargs="+", default=["png"], choices=FORMATS, dest="formats",
                   help="png: NAME_mask.png + NAME_prob.png; coco: predictions.coco.json (RLE); npz: NAME_prob.npz (default png)")
    p.add_argument("--no-overlay", action="store_true", help="do not write NAME_overlay.jpg")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out that fsdiff did not write")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_method_args(p)
    _add_augment_args(p)


def _eval_parser(sub) -> None:
    from fsdiff.synth import SUPPORT_ANNOTATIONS

    p = sub.add_parser("eval", help="score a method on a few-shot benchmark fold", formatter_class=argparse.RawTextHelpFormatter)
    _add_source_args(p)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--episodes", type=int, default=1000, help="episodes per seed (HSNet: 1000; fss1000 uses every test image)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds (default: the protocol's)")
    p.add_argument("--protocol", choices=["hsnet", "bam"], default="hsnet", help="episode sampling protocol")
    p.add_argument("--resolution", default="original", help="score at the 'original' label size or a fixed size such as 400 (HSNet)")
    p.add_argument("--episode-list", default=None, metavar="FILE", help="score on the episodes in this file instead of sampling")
    p.add_argument("--save-episodes", default=None, metavar="FILE", help="write the sampled episodes to this file")
    p.add_argument("--split", choices=["trn"], default=None,
                   help="score the fold's base (training) classes instead of its test classes,\ne.g. to choose a "
                        "training-free method's settings without touching the test classes")
    p.add_argument("--support-annotation", choices=list(SUPPORT_ANNOTATIONS), default="mask",
                   help="turn every support mask into this annotation first (weak-label benchmarks; default mask)")
    p.add_argument("--calibrate-threshold", type=int, default=0, metavar="N", help="choose the decision threshold on N episodes of the fold's base classes first")
    p.add_argument("--skip-small-classes", action="store_true", help="leave out classes with no more images than --shots (small datasets); they are listed in summary.json")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="also write per_class_iou.png and the N best and N worst episodes (episodes_best_worst.png)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for summary.json and per_class.csv")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_method_args(p)
    _add_augment_args(p)


def _augment_parser(sub) -> None:
    p = sub.add_parser("augment", help="DifFSS: pre-generate auxiliary supports into a cache, or list/check a cache")
    asub = p.add_subparsers(dest="augment_command", metavar="VERB")
    asub.required = True
    g = asub.add_parser("generate", help="generate N images per support candidate of a fold or folder (shards under accelerate launch)")
    _add_source_args(g)
    g.add_argument("--split", default=None, help="which split's images (default: the benchmark's test split; 'trn' for training)")
    g.add_argument("--condition", default="seg:4", metavar="KIND:N", help="control kind and images per support (default seg:4)")
    g.add_argument("--cache", required=True, metavar="DIR", help="generation cache folder")
    g.add_argument("--sd-model", default=None, metavar="ID|DIR")
    g.add_argument("--controlnet", default=None, metavar="ID|DIR")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--resolution", type=int, default=512, help="short side of the generated images (default 512)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shard", default=None, metavar="I/N", help="this process's shard, e.g. 0/2 (default: from accelerate launch, else all)")
    g.add_argument("--no-progress", action="store_true")
    for verb, text in (("list", "list the cached images"), ("check", "verify every cached file against its checksum")):
        v = asub.add_parser(verb, help=text)
        v.add_argument("--cache", required=True, metavar="DIR")
        if verb == "check":
            v.add_argument("--cleanup", action="store_true", help="delete leftovers of interrupted writes")


def _train_parser(sub) -> None:
    from fsdiff.methods import METHOD_SPECS, trainable_methods

    p = sub.add_parser("train", help="train a method on a benchmark's base classes (accelerate launch for several GPUs)",
                       formatter_class=argparse.RawTextHelpFormatter,
                       description=_choices_help("methods:", [(n, METHOD_SPECS[n].summary) for n in trainable_methods()]))
    msub = p.add_subparsers(dest="method_name", metavar="METHOD")
    msub.required = True
    for name in trainable_methods():
        spec = METHOD_SPECS[name]
        d = spec.train_defaults
        m = msub.add_parser(name, help=spec.summary, description=f"train {name}: {spec.summary}")
        _add_source_args(m)
        m.add_argument("--all-classes", action="store_true", help="train on every class (no held-out fold), e.g. for a deployment model")
        for opt in spec.model_options:
            m.add_argument(f"--{opt.name}", default=None, metavar="NAME|DIR", help=opt.help)
        m.add_argument("--input-size", type=int, default=None, help=f"image size (default {d.get('input_size', 'the config')})")
        m.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.get('steps', 'the recipe')})")
        m.add_argument("--batch-size", type=int, default=None, help=f"default {d.get('batch_size', 'the recipe')}")
        m.add_argument("--lr", type=float, default=None, help=f"default {d.get('lr', 'the recipe')}")
        m.add_argument("--warmup", type=int, default=None)
        m.add_argument("--config-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the method's config, repeatable")
        m.add_argument("--save-every", type=int, default=250, help="write a resumable checkpoint every N steps")
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core CPU)")
        m.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
        m.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint-STEP/, final/, train_log.jsonl (re-running resumes)")
        m.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fsdiff`` command."""
    parser = argparse.ArgumentParser(prog="fsdiff", description="Few-shot semantic segmentation with diffusion models.")
    parser.add_argument("--version", action="version", version=f"fsdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _segment_parser(sub)
    _eval_parser(sub)
    sub.add_parser("methods", help="list the methods, whether their weights are here, and what to download if not")
    _augment_parser(sub)
    _train_parser(sub)
    p = sub.add_parser("demo", help="segment the bundled example images and write overlays", formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="fsdiff-demo", metavar="DIR", help="output folder (default: ./fsdiff-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out that fsdiff did not write")
    _add_method_args(p)
    p = sub.add_parser("app", help="start the web app: annotate supports, segment your photos, correct, export (needs fsdiff[app])")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also create a temporary public gradio.live link (off by default)")
    return parser


def _parse_value(text: str):
    """A method option value: JSON numbers/booleans/lists, anything else as a string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_values(items: Sequence[str], flag: str) -> dict:
    """``KEY=VALUE`` items as a dict (values parsed by :func:`_parse_value`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FsdiffError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} steps=20.")
        out[key.strip().replace("-", "_") if flag == "--method-arg" else key.strip()] = _parse_value(value)
    return out


def _segmenter(args: argparse.Namespace, benchmark: dict | None = None):
    """The method named on the command line as an ``fsdiff.api.Segmenter`` (with DifFSS supports if asked)."""
    from fsdiff.api import Segmenter

    augment_options = None
    if getattr(args, "augment", None):
        augment_options = {"cache": args.augment_cache, "model": args.sd_model, "controlnet": args.controlnet,
                           "steps": args.augment_steps, "resolution": args.augment_resolution}
    return Segmenter(args.method, encoder=args.encoder, checkpoint=args.checkpoint, threshold=args.threshold,
                     benchmark=benchmark, augment=getattr(args, "augment", None), augment_options=augment_options,
                     support_masks=args.support_masks, refine=args.refine,
                     **_key_values(args.method_arg, "--method-arg"))


def expand_queries(items: Sequence[str]) -> list[str]:
    """``--query`` items as files: a folder gives its images (sorted), a glob its matches (sorted)."""
    out: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                           and not p.name.startswith("."))
            if not found:
                raise FsdiffError(f"--query {item}: the folder holds no image ({', '.join(IMAGE_EXTS)}).")
            out += found
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
            if not found:
                raise FsdiffError(f"--query {item!r}: the pattern matches no file.")
            out += found
        elif not path.is_file():
            raise FsdiffError(f"--query {item}: no such file or folder.")
        else:
            out.append(str(path))
    return out


def _parse_points(values: Sequence[str]) -> list[tuple[float, float, int]]:
    points = []
    for v in values:
        parts = v.split(",")
        try:
            nums = [float(x) for x in parts]
            if len(nums) not in (2, 3) or (len(nums) == 3 and nums[2] not in (0, 1)):
                raise ValueError
        except ValueError:
            raise FsdiffError(f"--points {v!r}: expected X,Y or X,Y,LABEL in pixels with LABEL 1 (object) or 0 "
                              "(background), e.g. --points 120,80 30,40,0.") from None
        points.append((nums[0], nums[1], int(nums[2]) if len(nums) == 3 else 1))
    return points


def _cmd_segment(args: argparse.Namespace) -> int:
    from fsdiff.api import load_shot, parse_class_value
    from fsdiff.output import OutputFolder

    shots_args = getattr(args, "shots", None) or []
    if not shots_args:
        raise FsdiffError("segment needs at least one --support IMG followed by --mask PNG, --box X0,Y0,X1,Y1, "
                          "--scribble PNG or --points X,Y[,LABEL] ...")
    missing = [s["image"] for s in shots_args if not any(k in s for k in ("mask", "box", "scribble", "points"))]
    if missing:
        raise FsdiffError(f"support {missing[0]}: no annotation; follow --support with --mask PNG, --box X0,Y0,X1,Y1, "
                          "--scribble PNG or --points X,Y[,LABEL] ...")
    queries = expand_queries(args.query)
    OutputFolder(args.out, queries, formats=args.formats, overlay=not args.no_overlay, overwrite=args.overwrite)
    class_value = parse_class_value(args.class_value)
    shots = []
    for s in shots_args:
        s = dict(s)
        if "points" in s:
            s["points"] = _parse_points(s["points"])
        shots.append(load_shot(s.pop("image"), class_value=class_value, **s))
    seg = _segmenter(args)
    done: list[str] = []
    try:
        for r in seg.iter_segment(shots, queries, class_name=args.class_name, out=args.out, formats=args.formats,
                                  overlay=not args.no_overlay, overwrite=args.overwrite, progress=not args.no_progress):
            done.append(r.query_id)
            files = ", ".join(str(p) for p in r.files.paths()) if r.files is not None else ""
            print(f"{r.query_id}: {100.0 * float(r.mask.mean()):.1f}% of pixels -> {files}", flush=True)
    except KeyboardInterrupt:
        shown = ", ".join(done[:5]) + (" ..." if len(done) > 5 else "")
        print(f"fsdiff: interrupted: {len(done)} of {len(queries)} queries finished ({shown or 'none'}); their files "
              f"are complete and listed in {Path(args.out) / 'fsdiff_outputs.jsonl'}. Run again to finish.",
              file=sys.stderr)
        return 130
    print(f"wrote {len(done)} prediction{'' if len(done) == 1 else 's'} under {args.out}/")
    if seg.support_step is not None:
        from fsdiff.api import estimate_file_names

        est = [str(Path(args.out) / n) for n in estimate_file_names(shots).values()]
        if est:
            print(f"the support masks the method used, estimated from the weak labels: {', '.join(est)} "
                  "(--support-masks off to use the labels as they are)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fsdiff.api import evaluate_benchmark

    if args.threshold is not None and args.calibrate_threshold:
        raise FsdiffError("--threshold and --calibrate-threshold both set the threshold; give one of them.")
    bench = dict(dataset=args.dataset, fold=args.fold, convention=args.split_convention or "interleaved")
    summary, table = evaluate_benchmark(
        args.dataset, args.root, segmenter=_segmenter(args, benchmark=bench), fold=args.fold, shots=args.shots,
        episodes=args.episodes, seeds=args.seeds, protocol=args.protocol, resolution=args.resolution,
        episode_list=args.episode_list, save_episodes=args.save_episodes, skip_small_classes=args.skip_small_classes,
        calibrate_threshold=args.calibrate_threshold, support_annotation=args.support_annotation, split=args.split,
        out=args.out, progress=not args.no_progress, visualize=args.visualize, **_source_options(args),
    )
    print(table)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from fsdiff.methods import describe_methods

    for name, summary, status in describe_methods():
        st = status()
        print(f"{name:<14} {'ready' if st.ready else 'NOT READY':<10} {summary}")
        for line in st.detail.splitlines():
            print(f"{'':<25} {line}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fsdiff.api import demo
    from fsdiff.demo import CONTACT_SHEET, DEMO_JSON, format_demo_table

    records = demo(args.out, segmenter=_segmenter(args), overwrite=args.overwrite)
    print(format_demo_table(records))
    out = Path(args.out)
    print(f"IoU against the bundled reference masks. Open {out / CONTACT_SHEET} to see every case; numbers in "
          f"{out / DEMO_JSON}.")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        from fsdiff.app import launch
        import gradio  # noqa: F401
    except ImportError:
        raise FsdiffError('the web app needs gradio: pip install "fsdiff[app]" (or pip install "gradio>=6,<7").') from None
    print(f"fsdiff app: serving on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    launch(args.host, args.port, args.share)
    return 0


def _parse_shard(text: str | None):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise FsdiffError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/2.")
    return shard


def _cmd_augment(args: argparse.Namespace) -> int:
    import json

    from fsdiff.augment.pregenerate import check_cache, list_cache

    if args.augment_command == "list":
        rows = list_cache(args.cache)
        for row in rows:
            print(json.dumps(row, default=str))
        print(f"{len(rows)} cached image(s) in {args.cache}")
        return 0
    if args.augment_command == "check":
        report = check_cache(args.cache, cleanup=args.cleanup)
        print(json.dumps(report, indent=2, default=str))
        return 0 if not report.get("problems") else 1
    from fsdiff.api import open_source
    from fsdiff.augment.controls import parse_condition
    from fsdiff.augment.generate import GenerationConfig, load_generator
    from fsdiff.augment.pregenerate import pregenerate, process_device, resolve_shard

    kind, _n = parse_condition(args.condition)
    shard = resolve_shard(_parse_shard(args.shard))
    source = open_source(args.dataset, args.root, fold=args.fold, split=args.split, **_source_options(args))
    gen = load_generator(
        kind, model=args.sd_model, controlnet=args.controlnet, cache=args.cache,
        config=GenerationConfig(steps=args.steps, seed=args.seed).replace(resolution=args.resolution),
        device=process_device(None if args.shard is None else shard), lazy=False, shard=f"{shard[0]}/{shard[1]}",
    )
    report = pregenerate(source, gen, args.condition, cache=gen.cache, shard=shard, progress=not args.no_progress)
    print(json.dumps(report.as_dict(), indent=2, default=str))
    for failure in report.failed:
        print(f"fsdiff: skipped {failure}", file=sys.stderr)
    return 1 if report.failed else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fsdiff.api import train
    from fsdiff.methods import method_spec

    spec = method_spec(args.method_name)
    options = {opt.name: getattr(args, opt.name) for opt in spec.model_options}
    given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                               ("warmup", args.warmup)) if v is not None}
    result = train(
        args.method_name, args.dataset, args.root, args.out, fold=args.fold, all_classes=args.all_classes,
        config=_key_values(args.config_arg, "--config-arg"), input_size=args.input_size, seed=args.seed,
        save_every=args.save_every, progress=not args.no_progress, num_threads=args.threads,
        mixed_precision=args.mixed_precision, **_source_options(args), **options, **given,
    )
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.seconds_per_step:.2f} s/step); weights in {result.final_dir}")
    return 0


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fsdiff`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"segment": _cmd_segment, "eval": _cmd_eval, "methods": _cmd_methods, "demo": _cmd_demo,
                "augment": _cmd_augment, "train": _cmd_train, "app": _cmd_app}
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return handlers[args.command](args)
    except FsdiffError as exc:
        print(f"fsdiff: error: {cli_terms(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsdiff: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"fsdiff: error: out of memory in `fsdiff {args.command}`. Use fewer or smaller images, fewer shots, "
              "or (training) a smaller --batch-size; files already finished are kept.", file=sys.stderr)
        return 2
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
