"""This process's place under ``accelerate launch`` / torchrun, shared by DifFSS pre-generation and training.

``accelerate launch --multi_gpu --num_processes N`` starts N processes with ``WORLD_SIZE=N``; on a machine
without a GPU accelerate's ``PartialState()`` only picks the multi-CPU (gloo) backend when built with
``cpu=True``, otherwise it reports a single process and every process would do all the work. Everything
that asks "how many processes, which device" goes through :func:`partial_state` (and the trainer's
``Accelerator`` through :func:`use_cpu`) so that rule lives here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fsdiff.errors import FsdiffError


def world_size() -> int:
    """``WORLD_SIZE`` from the launcher (1 when unset or malformed)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def use_cpu() -> bool:
    """Whether accelerate must be told ``cpu=True``: no GPU here, or ``ACCELERATE_USE_CPU`` set by the launcher."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or not torch.cuda.is_available()


def partial_state() -> Any:
    """accelerate's PartialState for this process, on gloo when there is no GPU (see the module docstring)."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu())
    world = world_size()
    if world > 1 and int(state.num_processes) != world:
        raise FsdiffError(
            f"WORLD_SIZE={world} but accelerate reports {state.num_processes} process(es); refusing to split the "
            "work (every process would do all of it). Pass --shard I/N explicitly."
        )
    return state


def process_device() -> torch.device:
    """This process's device: accelerate's under a multi-process launch, else CUDA if available, else CPU."""
    if world_size() > 1:
        return partial_state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def num_processes() -> int:
    """How many processes share the work (1 without a multi-process launch)."""
    return int(partial_state().num_processes) if world_size() > 1 else 1
