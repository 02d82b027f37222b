"""The ``fsdiff`` command: ``segment``, ``eval`` and ``demo`` (each a thin shell over :mod:`fsdiff.api`).

User errors print one ``fsdiff: error: ...`` line and exit with status 2, without a traceback and
without partial output files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsdiff import __version__
from fsdiff.errors import FsdiffError


class _SupportAction(argparse.Action):
    """``--support IMG`` starts a new support shot; annotations attach to the latest one."""

    def __call__(self, parser, namespace, values, option_string=None):
        shots = getattr(namespace, "shots", None) or []
        shots.append({"image": values})
        namespace.shots = shots


class _AnnotationAction(argparse.Action):
    """``--mask/--box/--scribble VALUE`` annotates the latest ``--support``."""

    def __call__(self, parser, namespace, values, option_string=None):
        shots = getattr(namespace, "shots", None) or []
        key = option_string.lstrip("-")
        if not shots:
            parser.error(f"{option_string} {values} comes before any --support IMG; put it right after its support image.")
        last = shots[-1]
        taken = [k for k in ("mask", "box", "scribble") if k in last]
        if taken:
            parser.error(f"support {last['image']} already has --{taken[0]}; give each --support exactly one annotation.")
        last[key] = values
        namespace.shots = shots


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from fsdiff.api import DEFAULT_METHOD

    p.add_argument("--method", default=DEFAULT_METHOD, help=f"segmentation method (default: {DEFAULT_METHOD})")
    p.add_argument("--encoder", default=None, help="frozen image encoder, e.g. efficientnet-lite2 or hf:DIR (default: the method's)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="trained weights of the method (default: the method's shipped or none)")
    p.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help="extra method option, repeatable (e.g. prior=DIR decoder=DIR for diffseg, steps=20 for diffup)",
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
    p.add_argument("--dataset", required=required, choices=["coco", "pascal", "fss1000", "folder"])
    p.add_argument("--root", required=required, metavar="DIR", help="dataset root (coco: the folder holding instances.json and images/, or the image folder when --ann is given)")
    p.add_argument("--ann", default=None, metavar="FILE", help="COCO-format instances json (coco only)")
    p.add_argument("--splits-dir", dest="splits", default=None, metavar="DIR", help="folder with the HSNet split lists (pascal, fss1000; or $FSDIFF_SPLITS)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--split-convention", choices=["interleaved", "contiguous"], default="interleaved", help="COCO-20i fold convention")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fsdiff`` command."""
    parser = argparse.ArgumentParser(prog="fsdiff", description="Few-shot semantic segmentation with diffusion models.")
    parser.add_argument("--version", action="version", version=f"fsdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("segment", help="segment query images from annotated support images")
    p.add_argument("--support", action=_SupportAction, metavar="IMG", help="a support image (repeat for K shots)")
    p.add_argument("--mask", action=_AnnotationAction, metavar="PNG", help="mask of the preceding --support")
    p.add_argument("--box", action=_AnnotationAction, metavar="X0,Y0,X1,Y1", help="box of the preceding --support, in pixels")
    p.add_argument("--scribble", action=_AnnotationAction, metavar="PNG", help="scribble of the preceding --support (1/255 = class, 2/128 = background)")
    p.add_argument("--class-value", default=None, help="label value (or R,G,B colour) of the class in class-index/palette/colour masks")
    p.add_argument("--class-name", default="object", help="name of the class (used by text-aware methods)")
    p.add_argument("--query", nargs="+", required=True, metavar="IMG", help="images to segment")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for masks, probability maps and overlays")
    _add_method_args(p)
    _add_augment_args(p)

    p = sub.add_parser("eval", help="score a method on a few-shot benchmark fold")
    _add_source_args(p)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--episodes", type=int, default=1000, help="episodes per seed (HSNet: 1000; fss1000 uses every test image)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds (default: the protocol's)")
    p.add_argument("--protocol", choices=["hsnet", "bam"], default="hsnet", help="episode sampling protocol")
    p.add_argument("--resolution", default="original", help="score at the 'original' label size or a fixed size such as 400 (HSNet)")
    p.add_argument("--episode-list", default=None, metavar="FILE", help="score on the episodes in this file instead of sampling")
    p.add_argument("--save-episodes", default=None, metavar="FILE", help="write the sampled episodes to this file")
    p.add_argument("--split", choices=["trn"], default=None,
                   help="score the fold's base (training) classes instead of its test classes, e.g. to choose a "
                        "training-free method's settings without touching the test classes")
    p.add_argument("--support-annotation", choices=["mask", "box", "scribble"], default="mask",
                   help="turn every support mask into this annotation first (weak-label benchmarks; default mask)")
    p.add_argument("--calibrate-threshold", type=int, default=0, metavar="N", help="choose the decision threshold on N episodes of the fold's base classes first")
    p.add_argument("--skip-small-classes", action="store_true", help="leave out classes with no more images than --shots (small datasets); they are listed in summary.json")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for summary.json and per_class.csv")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_method_args(p)
    _add_augment_args(p)

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

    p = sub.add_parser("train", help="train a method on a benchmark's base classes (accelerate launch for several GPUs)")
    p.add_argument("method_name", choices=["diffup", "diffseg"], metavar="METHOD", help="the method to train: diffup or diffseg")
    _add_source_args(p)
    p.add_argument("--all-classes", action="store_true", help="train on every class (no held-out fold), e.g. for a deployment model")
    p.add_argument("--encoder", default=None, help="diffup: frozen encoder (default efficientnet-lite0)")
    p.add_argument("--prior", default=None, metavar="ID|DIR", help="diffseg: Kandinsky 2.2 prior (default kandinsky-community/kandinsky-2-2-prior)")
    p.add_argument("--decoder", default=None, metavar="ID|DIR", help="diffseg: Kandinsky 2.2 decoder (default kandinsky-community/kandinsky-2-2-decoder)")
    p.add_argument("--input-size", type=int, default=None, help="image size (default: diffup 448, diffseg 512)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: diffup 300; diffseg 200 epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="default: diffup 8, diffseg 4")
    p.add_argument("--lr", type=float, default=None, help="default: diffup 3e-4 (AdamW), diffseg 0.01 (SGD)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--config-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the method's config, repeatable (e.g. query_channels=0 for diffup)")
    p.add_argument("--save-every", type=int, default=250, help="write a resumable checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core CPU)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint-STEP/, final/, train_log.jsonl (re-running resumes)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="segment the bundled example images and write overlays")
    p.add_argument("--out", default="fsdiff-demo", metavar="DIR", help="output folder (default: ./fsdiff-demo)")
    _add_method_args(p)
    return parser


def _parse_value(text: str):
    """A method option value: JSON numbers/booleans/lists, anything else as a string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _method_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for the method from --checkpoint and --method-arg KEY=VALUE."""
    kwargs = {}
    for item in args.method_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FsdiffError(f"--method-arg {item!r}: expected KEY=VALUE, e.g. --method-arg steps=20.")
        kwargs[key.strip().replace("-", "_")] = _parse_value(value)
    if args.checkpoint is not None:
        kwargs["checkpoint"] = args.checkpoint
    return kwargs


def _segmenter(args: argparse.Namespace, benchmark: dict | None = None):
    """The method named on the command line, wrapped with DifFSS supports when --augment is given."""
    from fsdiff.api import build_segmenter, with_augmentation

    seg = build_segmenter(args.method, encoder=args.encoder, benchmark=benchmark, **_method_kwargs(args))
    if getattr(args, "augment", None):
        seg = with_augmentation(
            seg, args.augment, cache=args.augment_cache, model=args.sd_model, controlnet=args.controlnet,
            steps=args.augment_steps, resolution=args.augment_resolution,
        )
    return seg


def _cmd_segment(args: argparse.Namespace) -> int:
    from fsdiff.api import load_query, load_shot, parse_class_value, segment

    shots_args = getattr(args, "shots", None) or []
    if not shots_args:
        raise FsdiffError("segment needs at least one --support IMG followed by --mask PNG, --box x0,y0,x1,y1 or --scribble PNG.")
    class_value = parse_class_value(args.class_value)
    shots = [load_shot(s.pop("image"), class_value=class_value, **s) for s in shots_args]
    queries = [load_query(q) for q in args.query]
    seg = _segmenter(args)
    results = segment(shots, queries, class_name=args.class_name, out=args.out, segmenter=seg)
    for r in results:
        frac = 100.0 * float(r.mask.mean())
        print(f"{r.query_id}: {frac:.1f}% of pixels -> {r.files.mask}, {r.files.overlay}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fsdiff.api import evaluate_benchmark

    seg = _segmenter(args, benchmark=dict(dataset=args.dataset, fold=args.fold, convention=args.split_convention))
    summary, table = evaluate_benchmark(
        dataset=args.dataset,
        root=args.root,
        ann=args.ann,
        splits_dir=args.splits,
        fold=args.fold,
        shots=args.shots,
        method=args.method,
        encoder=args.encoder,
        episodes=args.episodes,
        seeds=args.seeds,
        protocol=args.protocol,
        convention=args.split_convention,
        resolution=args.resolution,
        episode_list=args.episode_list,
        save_episodes=args.save_episodes,
        skip_small_classes=args.skip_small_classes,
        calibrate_threshold=args.calibrate_threshold,
        support_annotation=args.support_annotation,
        split=args.split,
        out=args.out,
        progress=not args.no_progress,
        segmenter=seg,
    )
    print(table)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fsdiff.api import build_segmenter, demo

    results = demo(args.out, segmenter=build_segmenter(args.method, encoder=args.encoder, **_method_kwargs(args)))
    for r in results:
        print(f"{r.name}: 1-shot ({r.annotation} support) -> {r.query}: IoU {100 * r.iou:.1f}% vs the reference mask; overlay {r.files.overlay}")
    print(f"wrote {len(results)} predictions under {args.out}/")
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
    source = open_source(args.dataset, args.root, fold=args.fold, split=args.split, ann=args.ann, splits_dir=args.splits, convention=args.split_convention)
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


def _config_overrides(items: Sequence[str]) -> dict:
    """--config-arg KEY=VALUE items as a dict (values parsed like --method-arg)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FsdiffError(f"--config-arg {item!r}: expected KEY=VALUE, e.g. --config-arg query_channels=0.")
        out[key.strip()] = _parse_value(value)
    return out


def _check_fields(method: str, fields: dict, config_cls) -> None:
    """Raise an FsdiffError naming --config-arg keys that are not fields of the method's config."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    bad = sorted(set(fields) - known)
    if bad:
        raise FsdiffError(
            f"--config-arg {', '.join(bad)}: not a field of the {method} config; known fields: {', '.join(sorted(known))}."
        )


_TRAIN_ONLY = {"diffup": (("encoder", "--encoder"),), "diffseg": (("prior", "--prior"), ("decoder", "--decoder"))}
"""`fsdiff train` options that only one method uses (each method's own models)."""


def _check_train_options(args: argparse.Namespace) -> None:
    """Raise an FsdiffError for an option of the other trainable method (it would be silently ignored)."""
    method = args.method_name
    for other, options in _TRAIN_ONLY.items():
        if other == method:
            continue
        given = [flag for attr, flag in options if getattr(args, attr) is not None]
        if given:
            own = ", ".join(flag for _, flag in _TRAIN_ONLY[method])
            raise FsdiffError(
                f"{', '.join(given)}: only used by `fsdiff train {other}`; {method} takes its models from {own}. "
                f"Drop {' and '.join(given)}, or train {other}."
            )


def _merge_option(fields: dict, key: str, value, flag: str) -> dict:
    """``fields`` with ``key`` set from a dedicated option; a conflicting --config-arg is an error."""
    if value is None:
        return fields
    if key in fields and fields[key] != value:
        raise FsdiffError(f"{flag} {value} and --config-arg {key}={fields[key]} disagree; give one of them.")
    return {**fields, key: value}


def _cmd_train(args: argparse.Namespace) -> int:
    from fsdiff.api import open_source

    _check_train_options(args)
    fold = None if args.all_classes else args.fold
    source = open_source(args.dataset, args.root, fold=fold, split="trn", ann=args.ann, splits_dir=args.splits, convention=args.split_convention)
    common = dict(seed=args.seed, save_every=args.save_every, progress=not args.no_progress, num_threads=args.threads,
                  mixed_precision=args.mixed_precision)
    given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr), ("warmup", args.warmup)) if v is not None}
    fields = _config_overrides(args.config_arg)
    if args.method_name == "diffup":
        from fsdiff.methods.diffup.config import DiffUpConfig
        from fsdiff.methods.diffup.training import cpu_config, train_diffup

        _check_fields("diffup", fields, DiffUpConfig)
        config = cpu_config(**_merge_option(fields, "input_size", args.input_size, "--input-size"))
        result = train_diffup(source, args.out, config=config, encoder=args.encoder or "efficientnet-lite0", **common, **given)
    else:
        from fsdiff.methods.diffseg.config import DiffSegConfig
        from fsdiff.methods.diffseg.training import train_diffseg

        _check_fields("diffseg", fields, DiffSegConfig)
        for key, value, flag in (("prior_model", args.prior, "--prior"), ("decoder_model", args.decoder, "--decoder"),
                                 ("input_size", args.input_size, "--input-size")):
            fields = _merge_option(fields, key, value, flag)
        result = train_diffseg(source, args.out, config=DiffSegConfig(**fields), **common, **given)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.seconds_per_step:.2f} s/step); weights in {result.final_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fsdiff`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"segment": _cmd_segment, "eval": _cmd_eval, "demo": _cmd_demo, "augment": _cmd_augment, "train": _cmd_train}
    try:
        return handlers[args.command](args)
    except FsdiffError as exc:
        print(f"fsdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
