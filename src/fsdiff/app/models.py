"""Which methods and encoders the app offers, whether each can run here, and one shared model per choice.

Models are built once per (method, encoder) in the app process and shared by every session (their use is
read-only; predictions are serialised by :mod:`fsdiff.app.jobs`). A method whose weights are missing is
listed with the reason and the download hint from its registry entry (:func:`fsdiff.methods.describe_methods`),
and choosing it gives that message instead of an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsdiff.errors import FsdiffError

DEFAULT_ENCODER = ""
"""The encoder choice that keeps the method's own default."""


@dataclass(frozen=True)
class MethodChoice:
    """A method as the page lists it."""

    name: str
    summary: str
    ready: bool
    detail: str

    @property
    def label(self) -> str:
        """The dropdown label: the name, marked when the method cannot run here."""
        return self.name if self.ready else f"{self.name} (not ready: weights missing)"

    def message(self) -> str:
        """What the page says about the method."""
        if self.ready:
            return f"**{self.name}**: {self.summary}."
        return (f"**{self.name} cannot run on this machine**: its weights are missing. {self.summary}.\n\n"
                f"To use it: {self.detail}")


def method_choices() -> list[MethodChoice]:
    """Every registered method with its weights status (a failing status check counts as not ready)."""
    from fsdiff.methods import describe_methods

    out = []
    for name, summary, status in describe_methods():
        try:
            st = status()
            ready, detail = bool(st.ready), str(st.detail)
        except Exception as exc:  # a status check must not break the page; it names what failed
            ready, detail = False, f"{type(exc).__name__}: {exc}"
        out.append(MethodChoice(name, summary, ready, detail))
    return out


def method_choice(name: str) -> MethodChoice:
    """The choice named ``name``, or an FsdiffError naming the methods."""
    choices = method_choices()
    for c in choices:
        if c.name == name:
            return c
    raise FsdiffError(f"unknown method {name!r}; choose one of: {', '.join(c.name for c in choices)}.")


def encoder_choices() -> list[tuple[str, str]]:
    """(label, value) of the encoders offered: the method's default, then the built-in encoders."""
    from fsdiff.features import encoder_summaries

    return [("method default", DEFAULT_ENCODER)] + [(f"{n}: {s}", n) for n, s in encoder_summaries()
                                                    if not n.startswith("hf:")]


class ModelCache:
    """One segmenter per (method, encoder), built on first use and shared by every session."""

    def __init__(self, factory: Callable[..., Any] | None = None) -> None:
        if factory is None:
            from fsdiff.api import Segmenter

            factory = Segmenter
        self._factory = factory
        self._models: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, method: str, encoder: str = DEFAULT_ENCODER) -> Any:
        """The segmenter for ``method`` and ``encoder``; an FsdiffError with the download hint if it cannot run."""
        key = (method, encoder or DEFAULT_ENCODER)
        with self._lock:
            if key not in self._models:
                choice = method_choice(method)
                if not choice.ready:
                    raise FsdiffError(choice.message().replace("**", ""))
                self._models[key] = self._factory(method, encoder=encoder or None)
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)
