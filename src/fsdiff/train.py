"""The one trainer of fsdiff: every trainable method (DiffUp now, DiffSeg later) plugs in through the
:class:`Trainable` interface and is trained by :func:`train` (defaults AdamW, lr 1e-4, weight decay 1e-2,
cosine decay: fsdiff's choice for DiffUp, whose training recipe the available text of arXiv 2407.16182
does not give).

* **Accelerate**: runs through :class:`accelerate.Accelerator` (one process here; ``accelerate launch``
  for multi-GPU / multi-node with no code change). Batch generation is sharded by process index (each
  process draws its own episodes from ``(seed, step, process_index)``); gradients are averaged across
  processes with one all-reduce per step (the models are not wrapped in DDP, so a trainable's loss can
  call its models and read their configs directly); only the main process writes files.
* **Optimisation**: AdamW (``optimizer='adamw'``, the default) or SGD with momentum
  (``optimizer='sgd'``, ``momentum``; DiffSeg's recipe, DiffSeg §5.2), weight decay on weights with
  >= 2 dims only (biases, norms and embeddings of size 1-D are not decayed), linear warm-up then cosine
  decay to 0 (``schedule='cosine'``), a constant rate, or StepLR (``schedule='step'``: the rate is
  multiplied by ``gamma`` every ``step_size`` optimizer steps after the warm-up), gradient clipping at
  ``max_grad_norm``, optional bf16/fp16 autocast (``mixed_precision``).
* **Randomness**: the batch of step s comes from ``derive_rng(seed, 'batch', s, process)`` and the
  loss's torch generator from ``derive_rng(seed, 'loss', s, process)``, so a run is a pure function of
  its seed; ``train`` seeds the global torch / numpy / Python RNGs (dropout, anything implicit) from the
  seed as well and checkpoints their states.
* **Checkpoints**: ``out_dir/checkpoint-STEP/`` holds the trainable's ``save()`` output (models as
  ``config.json`` + ``*.safetensors``) plus ``trainer_state.json`` (scalars) and
  ``trainer_state.safetensors`` (optimizer moments, RNG states): **no pickle anywhere**; the optimizer
  and scheduler ``state_dict`` are flattened by :func:`flatten_state` (tensors to safetensors, the rest
  to JSON with tagged tuples / int-keyed dicts). Each checkpoint is written under a temporary name and
  renamed when complete, so a crash never leaves a half-written ``checkpoint-STEP``. ``out_dir/final/``
  holds the trainable's ``save()`` output at the end; ``out_dir/train_log.jsonl`` one JSON line per
  ``log_every`` steps (step, mean losses, lr, grad norm, seconds/step).
* **Resume** (``resume=True``): restarts from the latest complete checkpoint and reaches the same final
  weights as an uninterrupted run with the same seed.

The :class:`Trainable` convention: ``modules()`` names the trained ``diffusers.ModelMixin`` models, and
``save(dir, meta)`` writes each of them with ``save_pretrained`` to ``dir/<name>/`` (the trainer reloads
them from there on resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fsdiff.errors import FsdiffError
from fsdiff.io import atomic_path
from fsdiff.jsonutil import dumps
from fsdiff.synth import episode_rng as derive_rng  # one keyed-generator definition for the project

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LOG_FILE = "train_log.jsonl"
FINAL = "final"
SCHEDULES = ("cosine", "constant", "step")
OPTIMIZERS = ("adamw", "sgd")
MIXED_PRECISION = ("no", "bf16", "fp16")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_DEFAULT_SETTINGS: dict[str, Any] = {"optimizer": "adamw"}
"""Settings a checkpoint written before they existed (or with their default) implicitly had."""


@runtime_checkable
class Trainable(Protocol):
    """What :func:`train` needs from a method (see the module docstring for the save convention)."""

    name: str

    def modules(self) -> dict[str, Any]:
        """The trained models by name (``diffusers.ModelMixin``; saved to ``DIR/<name>/``)."""
        ...

    def make_batch(self, step: int, rng: np.random.Generator, batch_size: int) -> dict[str, Any]:
        """One training batch (a dict of tensors) drawn only from ``rng``."""
        ...

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{'loss': scalar with grad, **scalar parts}``; every random draw from ``generator``."""
        ...

    def save(self, directory: str | os.PathLike, meta: dict[str, Any]) -> Any:
        """Write the model checkpoint (each module via ``save_pretrained`` to ``directory/<name>``)."""
        ...


@dataclass
class TrainResult:
    """What a :func:`train` call did."""

    out_dir: Path
    final_dir: Path
    steps: int
    start_step: int
    seconds: float
    seconds_per_step: float
    last_loss: float | None
    log_path: Path


# ----------------------------------------------------------------------------------------------------
# pickle-free state (de)serialisation
# ----------------------------------------------------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, {key: tensor}) of a nested state: tensors and arrays go to the dict,
    tuples and dicts with non-string keys are tagged so :func:`unflatten_state` restores them exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().clone().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            dtype = str(x.dtype)
            arr = x.astype(np.int64) if x.dtype in (np.uint32, np.uint16) else x
            tensors[path] = torch.from_numpy(np.ascontiguousarray(arr).copy())
            return {"__ndarray__": path, "dtype": dtype}
        if isinstance(x, (np.integer,)):
            return int(x)
        if isinstance(x, (np.floating,)):
            return float(x)
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            items = []
            for i, (k, v) in enumerate(x.items()):
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise FsdiffError(f"cannot serialise state key {k!r} of type {type(k).__name__} at {path}.")
                items.append([k, walk(v, f"{path}.{i}")])
            return {"__dict__": items}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise FsdiffError(f"cannot serialise a {type(x).__name__} at {path} without pickle.")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]].clone()
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_states(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def lr_lambda(schedule: str, steps: int, warmup: int, step_size: int | None = None, gamma: float = 0.1):
    """The learning-rate multiplier per step: linear warm-up, then cosine decay to 0, constant, or
    ``schedule='step'``: ``gamma ** ((step - warmup) // step_size)`` (torch's StepLR, counted after the warm-up)."""
    if schedule == "step" and (step_size is None or int(step_size) < 1):
        raise FsdiffError(f"train: schedule='step' needs step_size >= 1 (optimizer steps), got {step_size!r}.")

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return float(step + 1) / float(warmup)
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return float(gamma) ** ((step - warmup) // int(step_size))  # type: ignore[arg-type]
        span = max(1, steps - warmup)
        progress = min(1.0, max(0.0, (step - warmup) / span))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def intact_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``checkpoint-STEP`` (both state files present) in ``out_dir``, newest first."""
    d = Path(out_dir)
    found = []
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """(step, path) of the latest complete ``checkpoint-STEP`` in ``out_dir``, or None."""
    found = intact_checkpoints(out_dir)
    return found[0] if found else None


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory onto ``target`` (replacing an old one)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _fresh_tmp(out_dir: Path, name: str) -> Path:
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise FsdiffError(f"train: {name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave them), restoring the count after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make_accelerator(mixed_precision: str):
    """A new Accelerator; an earlier one in this process with another precision is reset first."""
    from accelerate import Accelerator

    from fsdiff.distributed import use_cpu

    cpu = use_cpu()  # without it a GPU-less torchrun launch gives N independent single-process runs
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "already been initialized" in str(exc):
            try:  # a second train() call in one process (notebook, tests) with another precision
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state()
                return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
            except (ValueError, RuntimeError, AttributeError):
                pass
        raise FsdiffError(
            f"train: cannot set up mixed_precision={mixed_precision!r} here ({first}); on a CPU use 'no' or 'bf16', "
            "'fp16' needs a GPU."
        ) from None


# ----------------------------------------------------------------------------------------------------
# the parts of a run: settings, optimizer, resume, checkpoint writer, step
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """The validated settings of a run (see :func:`train` for their meaning)."""

    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    schedule: str = "cosine"
    warmup: int = 0
    seed: int = 0
    save_every: int = 0
    log_every: int = 10
    mixed_precision: str = "no"
    max_grad_norm: float | None = 1.0
    keep_last: int | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    step_size: int | None = None
    gamma: float = 0.1

    def recorded(self, num_processes: int) -> dict[str, Any]:
        """What a checkpoint records (and a resumed run must match: :data:`RESUME_KEYS`)."""
        rec = dict(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                   schedule=self.schedule, warmup=self.warmup, seed=self.seed, max_grad_norm=self.max_grad_norm,
                   mixed_precision=self.mixed_precision, num_processes=int(num_processes))
        if self.optimizer != "adamw":
            rec.update(optimizer=self.optimizer, momentum=self.momentum)
        if self.schedule == "step":
            rec.update(step_size=self.step_size, gamma=self.gamma)
        return rec


RESUME_KEYS = ("seed", "batch_size", "schedule", "warmup", "lr", "optimizer", "momentum", "step_size", "gamma")
"""Settings a resumed run must share with its checkpoint (the others may change, e.g. more steps)."""


def check_settings(**kwargs: Any) -> TrainSettings:
    """Validate the run settings (every bad value is an FsdiffError naming it)."""
    s = TrainSettings(**kwargs)
    ints = dict(steps=_check_int("steps", s.steps, 1), batch_size=_check_int("batch_size", s.batch_size, 1),
                warmup=_check_int("warmup", s.warmup, 0), save_every=_check_int("save_every", s.save_every, 0),
                log_every=_check_int("log_every", s.log_every, 1), seed=_check_int("seed", s.seed, 0))
    if s.keep_last is not None:
        ints["keep_last"] = _check_int("keep_last", s.keep_last, 1)
    checks = ((s.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {s.schedule!r}"),
              (s.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {s.optimizer!r}"),
              (0.0 <= float(s.momentum) < 1.0, f"momentum must lie in [0, 1), got {s.momentum!r}"),
              (s.mixed_precision in MIXED_PRECISION,
               f"mixed_precision must be one of {MIXED_PRECISION}, got {s.mixed_precision!r}"),
              (float(s.lr) > 0 and math.isfinite(float(s.lr)) and float(s.weight_decay) >= 0,
               f"need lr > 0 and weight_decay >= 0, got lr={s.lr!r}, weight_decay={s.weight_decay!r}"),
              (s.max_grad_norm is None or float(s.max_grad_norm) > 0,
               f"max_grad_norm must be > 0 or None, got {s.max_grad_norm!r}"))
    for ok, message in checks:
        if not ok:
            raise FsdiffError(f"train: {message}.")
    if s.schedule == "step":
        ints["step_size"] = _check_int("step_size", s.step_size, 1)
        if not 0.0 < float(s.gamma) <= 1.0:
            raise FsdiffError(f"train: gamma must lie in (0, 1], got {s.gamma!r}.")
    return dataclasses.replace(s, **ints, lr=float(s.lr), weight_decay=float(s.weight_decay))


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW or SGD with weight decay on >= 2-D weights only, and its LambdaLR schedule."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if s.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=float(s.momentum))
    else:
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s.schedule, s.steps, s.warmup, s.step_size,
                                                                       s.gamma))
    return optimizer, scheduler


def _model_config(trainable: Any) -> Any:
    """What the trainable says identifies its models' configuration (compared on resume), JSON-normalised."""
    get = getattr(trainable, "checkpoint_config", None)
    return json.loads(dumps(get())) if callable(get) else None


@dataclass
class _Loaded:
    """A checkpoint read completely into memory, before anything is applied."""

    step: int
    path: Path
    doc: dict
    tensors: dict
    modules: dict


def _read_checkpoint(step: int, ckpt: Path, modules: Mapping[str, Any]) -> _Loaded:
    """Every file of ``ckpt`` read and parsed (an FsdiffError when one is damaged)."""
    try:
        doc = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(ckpt / STATE_TENSORS))
        states = {}
        for name in modules:
            files = sorted((ckpt / name).glob("*.safetensors"))
            if not files:
                raise FsdiffError(f"{ckpt} has no {name}/*.safetensors (the trainable's save() must write each module "
                                  f"with save_pretrained to DIR/{name}/)")
            states[name] = {k: v for f in files for k, v in load_file(str(f)).items()}
    except FsdiffError:
        raise
    except Exception as exc:  # safetensors, JSON and OS errors of a damaged or half-copied checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FsdiffError(f"{ckpt} is damaged ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(doc, dict) or "optimizer" not in doc or "scheduler" not in doc:
        raise FsdiffError(f"{ckpt / STATE_JSON} is not a trainer state")
    return _Loaded(step, ckpt, doc, tensors, states)


def _check_compatible(loaded: _Loaded, settings: dict, model_config: Any, steps: int) -> None:
    """Refuse to resume a checkpoint written with other settings or another model configuration."""
    saved = loaded.doc.get("settings", {})
    for key in RESUME_KEYS:
        if key not in saved and key not in _DEFAULT_SETTINGS:
            continue
        was, now = saved.get(key, _DEFAULT_SETTINGS.get(key)), settings.get(key, _DEFAULT_SETTINGS.get(key))
        if was != now:
            raise FsdiffError(f"train: {loaded.path} was written with {key}={was!r} but this run asks for {now!r}; "
                              "resume with the same settings, or pass resume=False / a new out_dir.")
    recorded = loaded.doc.get("model_config")
    if recorded is not None and model_config is not None and recorded != model_config:
        diff = sorted(k for k in set(recorded) | set(model_config) if recorded.get(k) != model_config.get(k)) \
            if isinstance(recorded, dict) and isinstance(model_config, dict) else ["config"]
        shown = ", ".join(f"{k}={recorded.get(k)!r} (now {model_config.get(k)!r})" for k in diff[:4]) \
            if isinstance(recorded, dict) else "the model configuration"
        raise FsdiffError(f"train: {loaded.path} was trained with {shown}; resume with the same model settings, or "
                          "pass resume=False / a new out_dir.")
    if loaded.step > steps:
        raise FsdiffError(f"train: {loaded.path} is already past steps={steps}; ask for at least {loaded.step} steps.")


def resume_from_checkpoint(out: Path, modules: Mapping[str, Any], optimizer: Any, scheduler: Any, settings: dict,
                           model_config: Any, steps: int, proc: int) -> tuple[int, list[str]]:
    """Restore the newest intact checkpoint of ``out`` (damaged ones are skipped and reported); returns
    (its step or 0, the notes about skipped ones)."""
    notes: list[str] = []
    for step, ckpt in intact_checkpoints(out):
        try:
            loaded = _read_checkpoint(step, ckpt, modules)
        except FsdiffError as exc:
            notes.append(f"{exc}; skipped it")
            continue
        _check_compatible(loaded, settings, model_config, steps)
        for name, module in modules.items():
            try:
                module.load_state_dict(loaded.modules[name], strict=True)
            except RuntimeError as exc:
                raise FsdiffError(
                    f"checkpoint {ckpt}/{name} does not fit the model being trained ({str(exc).splitlines()[0]}); "
                    "resume only with the same configuration, or use a new out_dir."
                ) from None
        optimizer.load_state_dict(unflatten_state(loaded.doc["optimizer"], loaded.tensors))
        scheduler.load_state_dict(unflatten_state(loaded.doc["scheduler"], loaded.tensors))
        rng = loaded.doc.get("rng", {}).get(str(proc)) or loaded.doc.get("rng", {}).get("0")
        if rng is not None:
            set_rng_states(unflatten_state(rng, loaded.tensors))
        return step, notes
    if notes:
        raise FsdiffError(f"train: no intact checkpoint to resume from in {out}: {'; '.join(notes)}. Delete the "
                          "damaged checkpoint folders to start over, or pass resume=False / a new out_dir.")
    return 0, notes


class CheckpointWriter:
    """Writes ``checkpoint-STEP`` folders (trainable's save + pickle-free trainer state) and ``final``."""

    def __init__(self, out: Path, trainable: Any, accelerator: Any, settings: dict, model_config: Any,
                 keep_last: int | None) -> None:
        self.out, self.trainable, self.accelerator = out, trainable, accelerator
        self.settings, self.model_config, self.keep_last = settings, model_config, keep_last

    def checkpoint(self, step: int, optimizer: Any, scheduler: Any) -> None:
        """Write ``checkpoint-STEP`` atomically (every process's RNG state gathered first)."""
        acc, main = self.accelerator, self.accelerator.is_main_process
        opt_skel, opt_t = flatten_state(optimizer.state_dict(), "optimizer")
        sch_skel, sch_t = flatten_state(scheduler.state_dict(), "scheduler")
        proc = int(acc.process_index)
        gathered = [flatten_state(rng_states(), f"rng{proc}")]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object(gathered)
        if main:
            tmp = _fresh_tmp(self.out, f"checkpoint-{step}")
            self.trainable.save(tmp, {"step": step, "trainer": self.settings})
            tensors = {**opt_t, **sch_t}
            rng_doc = {}
            for i, (skel, t) in enumerate(gathered):
                rng_doc[str(i)] = skel
                tensors.update(t)
            save_file(tensors, str(tmp / STATE_TENSORS))
            doc = {"format": "fsdiff-trainer-state", "version": 1, "step": step, "settings": self.settings,
                   "model_config": self.model_config, "optimizer": opt_skel, "scheduler": sch_skel, "rng": rng_doc}
            (tmp / STATE_JSON).write_text(json.dumps(doc) + "\n", encoding="utf-8")
            _replace_dir(tmp, self.out / f"checkpoint-{step}")
            self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        ckpts = sorted((int(m.group(1)), p) for p in self.out.iterdir() if (m := _CKPT_RE.match(p.name)))
        for _, p in ckpts[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def final(self, steps: int) -> Path:
        """Write ``final/`` (the trainable's save) atomically."""
        if self.accelerator.is_main_process:
            tmp = _fresh_tmp(self.out, FINAL)
            self.trainable.save(tmp, {"step": steps, "trainer": self.settings})
            _replace_dir(tmp, self.out / FINAL)
        self.accelerator.wait_for_everyone()
        return self.out / FINAL


def _average_gradients(params: list[torch.nn.Parameter], accelerator: Any) -> None:
    """One all-reduce averaging every parameter's gradient across processes (no-op for one process)."""
    if accelerator.num_processes <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def train_step(trainable: Any, modules: Mapping[str, Any], params: list, optimizer: Any, scheduler: Any,
               accelerator: Any, s: TrainSettings, step: int, out: Path) -> dict[str, float]:
    """One optimizer step from the batch of ``step``; returns the scalars to log (losses, lr, grad norm, timing)."""
    proc = int(accelerator.process_index)
    t0 = time.perf_counter()
    batch = _to_device(trainable.make_batch(step, derive_rng(s.seed, "batch", step, proc), s.batch_size),
                       accelerator.device)
    t_data = time.perf_counter() - t0
    gen = torch.Generator()
    gen.manual_seed(int(derive_rng(s.seed, "loss", step, proc).integers(0, 2**63 - 1)))
    for m in modules.values():
        m.train()
    with accelerator.autocast():
        losses = trainable.loss(batch, gen)
    loss = losses["loss"]
    if not torch.isfinite(loss.detach()).all():
        raise FsdiffError(f"train: the loss became {float(loss.detach())} at step {step}; lower lr (now {s.lr}) or "
                          f"check the data; the last good checkpoint is {latest_checkpoint(out)}.")
    accelerator.backward(loss)
    _average_gradients(params, accelerator)
    record = {k: float(v.detach()) for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    if s.max_grad_norm is not None:
        record["grad_norm"] = float(accelerator.clip_grad_norm_(params, float(s.max_grad_norm)))
    record["lr"] = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record.update(data_s=t_data, sec_per_step=time.perf_counter() - t0)
    return record


def _prepare_out(out: Path, main: bool, start_step: int) -> Path:
    """Clear leftovers of a crashed save and keep the log lines up to ``start_step``; returns the log path."""
    log_path = out / LOG_FILE
    if main:
        kept = []
        if log_path.is_file() and start_step > 0:
            for line in log_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError):
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
        with atomic_path(log_path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return log_path


def _seed_globals(seed: int, proc: int) -> None:
    """Global RNGs (dropout, anything implicit) start from the seed too; a resume restores them afterwards."""
    global_seed = int(derive_rng(seed, "global", proc).integers(0, 2**32 - 1))
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    random.seed(global_seed)


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------
def train(
    trainable: Trainable,
    out_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    schedule: str = "cosine",
    warmup: int = 0,
    seed: int = 0,
    save_every: int = 0,
    resume: bool = True,
    log_every: int = 10,
    mixed_precision: str = "no",
    max_grad_norm: float | None = 1.0,
    keep_last: int | None = None,
    progress: bool = True,
    accelerator: Any = None,
    num_threads: int | None = None,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    step_size: int | None = None,
    gamma: float = 0.1,
) -> TrainResult:
    """Train ``trainable`` for ``steps`` optimizer steps into ``out_dir`` (see the module docstring).

    ``save_every``: write ``checkpoint-STEP`` every that many steps and at the end (0 = only ``final/``).
    ``keep_last``: keep only the newest N checkpoints (None = all). ``accelerator``: an existing
    ``accelerate.Accelerator`` (default: a new one with ``mixed_precision``). ``num_threads``: torch CPU
    threads during training (restored afterwards; 1 is fastest on a CPU shared with other jobs).
    ``optimizer``: 'adamw' (betas 0.9/0.999) or 'sgd' (with ``momentum``). ``schedule='step'``: multiply the
    rate by ``gamma`` every ``step_size`` optimizer steps (after ``warmup``). ``resume``: continue from the
    newest intact checkpoint (a damaged one is skipped and reported; one written with other settings or
    another model configuration is refused).
    """
    for attr in ("modules", "make_batch", "loss", "save"):
        if not callable(getattr(trainable, attr, None)):
            raise FsdiffError(f"train: the trainable {type(trainable).__name__} has no {attr}() method.")
    s = check_settings(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                       warmup=warmup, seed=seed, save_every=save_every, log_every=log_every,
                       mixed_precision=mixed_precision, max_grad_norm=max_grad_norm, keep_last=keep_last,
                       optimizer=optimizer, momentum=momentum, step_size=step_size, gamma=gamma)
    if num_threads is not None:
        num_threads = _check_int("num_threads", num_threads, 1)
    with _torch_threads(num_threads):
        return _run(trainable, Path(out_dir), s, accelerator or _make_accelerator(s.mixed_precision), resume, progress)


def _run(trainable: Any, out: Path, s: TrainSettings, accelerator: Any, do_resume: bool, progress: bool) -> TrainResult:
    """The training loop of :func:`train` with validated settings."""
    main, proc = accelerator.is_main_process, int(accelerator.process_index)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in (".checkpoint-*.tmp-*", f".{FINAL}.tmp-*"):  # leftovers of a crashed save
            for p in out.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    modules = dict(trainable.modules())
    if not modules:
        raise FsdiffError(f"train: {type(trainable).__name__}.modules() returned no model to train.")
    for m in modules.values():
        m.to(accelerator.device)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise FsdiffError("train: the trainable's modules have no parameter that requires a gradient.")
    optimizer, scheduler = make_optimizer(params, s)
    optimizer = accelerator.prepare(optimizer)
    settings, model_config = s.recorded(accelerator.num_processes), _model_config(trainable)
    _seed_globals(s.seed, proc)
    start_step, notes = (0, [])
    if do_resume:
        start_step, notes = resume_from_checkpoint(out, modules, optimizer, scheduler, settings, model_config, s.steps,
                                                   proc)
    for note in notes if main else []:
        print(f"fsdiff: warning: {note}; resuming from {'step ' + str(start_step) if start_step else 'the start'}.",
              file=sys.stderr)
    log_path = _prepare_out(out, main, start_step)
    writer = CheckpointWriter(out, trainable, accelerator, settings, model_config, s.keep_last)
    bar = tqdm(total=s.steps, initial=start_step, desc=f"train {getattr(trainable, 'name', 'model')}", unit="step",
               disable=not (progress and main), file=sys.stderr, dynamic_ncols=True)
    t_start, window, step_times, last_loss = time.perf_counter(), {}, [], None
    try:
        for step in range(start_step, s.steps):
            record = train_step(trainable, modules, params, optimizer, scheduler, accelerator, s, step, out)
            step_times.append(record["sec_per_step"])
            last_loss = record["loss"]
            lr_now = record.pop("lr")
            for k, v in record.items():
                window.setdefault(k, []).append(v)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", s_step=f"{record['sec_per_step']:.2f}", refresh=False)
            if (done % s.log_every == 0 or done == s.steps) and main:
                rec = {"step": done, "lr": lr_now, **{k: float(np.mean(v)) for k, v in window.items()},
                       "elapsed_s": time.perf_counter() - t_start}
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if done % s.log_every == 0 or done == s.steps:
                window = {}
            if s.save_every and (done % s.save_every == 0 or done == s.steps):
                writer.checkpoint(done, optimizer, scheduler)
    finally:
        bar.close()
    final = writer.final(s.steps)
    seconds = time.perf_counter() - t_start
    return TrainResult(out_dir=out, final_dir=final, steps=s.steps, start_step=start_step, seconds=seconds,
                       seconds_per_step=float(np.mean(step_times)) if step_times else 0.0, last_loss=last_loss,
                       log_path=log_path)


__all__ = ["OPTIMIZERS", "SCHEDULES", "CheckpointWriter", "Trainable", "TrainResult", "TrainSettings", "check_settings",
           "derive_rng", "flatten_state", "intact_checkpoints", "latest_checkpoint", "lr_lambda", "make_optimizer",
           "resume_from_checkpoint", "rng_states", "set_rng_states", "train", "train_step", "unflatten_state"]
