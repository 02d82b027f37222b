"""DiffSeg segmenters (DiffSeg §4, Eq. (8)-(11)): the Segmenter protocol of fsdiff.protocol on top of
:class:`~fsdiff.methods.diffseg.model.DiffSegModel`. The paper does not describe inference; one UNet pass
per query on a fixed-noise latent (see the model) is fsdiff's reconstruction.

* ``diffseg-prior`` (:class:`DiffSegPriorSegmenter`): training-free. The attention prior M_a (Eq. 11; one
  Kandinsky UNet pass per query with the k-shot mean CLIP embedding of the masked supports) is upsampled
  bilinearly from the latent grid to the query's resolution and used as the probability map. Its threshold is
  ``prior_threshold`` (0.5) or one chosen on a validation split with :func:`fsdiff.evaluate.choose_threshold`. With a
  ``checkpoint`` the trained SCM steers the attention (the PAM is not used).
* ``diffseg`` (:class:`DiffSegSegmenter`): the full model (PAM + SCM from a checkpoint written by
  :meth:`DiffSegModel.save_trainable`); the probability map is the soft read-out of I_pre
  (``clamp((mean_c(I_pre) + 1) / 2)``, so ``> 0.5`` is the paper's ``mean > 0`` mask), resized bilinearly
  from ``input_size`` to the query's resolution.

Images are resized (squashed) to ``input_size`` x ``input_size``; support annotations are turned into
foreground masks with ``annotation.regions`` (mask, box, scribble or points; DiffSeg was designed for masks).
"""

from __future__ import annotations

import abc

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.diffusion.loading import KandinskyParts
from fsdiff.episode import Episode
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffseg.config import DiffSegConfig
from fsdiff.checkpoint import read_checkpoint
from fsdiff.methods.diffseg.model import TRAIN_HINT, DiffSegModel, DiffSegOutput, image_to_tensor, \
    load_diffseg_model, support_tensors

_ALIASES = {"prior": "prior_model", "decoder": "decoder_model"}


def _config_from(base: DiffSegConfig | None, checkpoint: str | os.PathLike[str] | None,
                 overrides: dict[str, Any]) -> DiffSegConfig:
    """Config = ``base`` or the checkpoint's recorded config or the defaults, then ``overrides``."""
    opts = {_ALIASES.get(k, k): v for k, v in overrides.items() if v is not None or k in ("prior_size", "dtype")}
    cfg = base
    if cfg is None and checkpoint is not None:
        cfg = DiffSegConfig.from_dict(read_checkpoint(checkpoint, "diffseg", hint=TRAIN_HINT).config, strict=False)
    cfg = cfg or DiffSegConfig()
    return cfg.updated(**opts) if opts else cfg


class _DiffSegBase(abc.ABC):
    """Shared episode handling: resize, encode the supports once, run the queries in chunks."""

    name = "diffseg-base"

    def __init__(
        self,
        config: DiffSegConfig | None = None,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        model: DiffSegModel | None = None,
        parts: KandinskyParts | None = None,
        threshold: float | None = None,
        **overrides: Any,
    ) -> None:
        if model is not None:
            self.model = model
            if config is not None or overrides:
                self.model.config = _config_from(config or model.config, None, overrides)
        else:
            cfg = _config_from(config, checkpoint, overrides)
            self.model = load_diffseg_model(cfg, checkpoint=checkpoint, parts=parts)
        self.model.eval()
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.threshold = float(threshold) if threshold is not None else self._default_threshold()
        if not 0.0 <= self.threshold <= 1.0:
            raise FsdiffError(f"{self.name}: threshold must lie in [0, 1], got {self.threshold}.")

    @property
    def config(self) -> DiffSegConfig:
        """The model's configuration."""
        return self.model.config

    @property
    def encoder_name(self) -> str:
        """The frozen image encoder: the CLIP vision tower of the Kandinsky 2.2 prior it loads."""
        return str(self.config.prior_model)

    def _default_threshold(self) -> float:
        return float(self.config.threshold)

    @abc.abstractmethod
    def _maps(self, out: DiffSegOutput) -> torch.Tensor:
        """The (B, 1, h, w) probability maps this segmenter reads from the model output."""

    def _decode(self) -> bool:
        return True

    @torch.no_grad()
    def predict(self, episode: Episode) -> list[np.ndarray]:
        """Probability of the episode's class for every pixel of every query (float32, query size, [0, 1])."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"{self.name}: predict() takes an Episode, got {type(episode).__name__}.")
        size = self.config.input_size
        s_img, s_mask = support_tensors(episode, size)
        emb, lat = self.model.encode_support(s_img, s_mask)
        out: list[np.ndarray] = []
        queries = list(episode.queries)
        step = max(1, int(self.config.inference_batch_size))
        for start in range(0, len(queries), step):
            chunk = queries[start:start + step]
            q = torch.stack([image_to_tensor(x.image, size) for x in chunk]).to(self.model.device)
            res = self.model.run(q, emb, lat, decode=self._decode(), pam=self._decode())
            maps = self._maps(res).float()
            for query, m in zip(chunk, maps):
                h, w = query.shape
                m = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                out.append(m.clamp(0.0, 1.0).cpu().numpy().astype(np.float32))
        return out


class DiffSegPriorSegmenter(_DiffSegBase):
    """Training-free DiffSeg: the Kandinsky attention prior M_a (Eq. 11) as the probability map."""

    name = "diffseg-prior"

    def _default_threshold(self) -> float:
        return float(self.config.prior_threshold)

    def _decode(self) -> bool:
        return False

    def _maps(self, out: DiffSegOutput) -> torch.Tensor:
        return out.prior


class DiffSegSegmenter(_DiffSegBase):
    """The full DiffSeg (PAM + SCM from ``checkpoint``): soft read-out of the decoded prediction I_pre."""

    name = "diffseg"

    def __init__(self, config: DiffSegConfig | None = None, *, checkpoint: str | os.PathLike[str] | None = None,
                 model: DiffSegModel | None = None, **kwargs: Any) -> None:
        if checkpoint is None and model is None:
            raise FsdiffError(
                "diffseg: the full DiffSeg model needs trained PAM/SCM weights: train them (fsdiff.api.train('diffseg', "
                "...) or `fsdiff train diffseg`) and pass the run folder as checkpoint=DIR, or use the training-free "
                "method 'diffseg-prior'."
            )
        super().__init__(config, checkpoint=checkpoint, model=model, **kwargs)

    def _maps(self, out: DiffSegOutput) -> torch.Tensor:
        assert out.prob is not None
        return out.prob




def status():
    """Whether ``diffseg-prior`` runs here: the Kandinsky 2.2 prior and decoder in the local folders or cache."""
    from fsdiff.diffusion.loading import local_status
    from fsdiff.methods import WeightsStatus

    cfg = DiffSegConfig()
    found = [local_status(cfg.prior_model, "kandinsky-prior"), local_status(cfg.decoder_model, "kandinsky-decoder")]
    missing = [hint for ok, hint in found if not ok]
    if missing:
        return WeightsStatus(False, "\n".join(missing))
    return WeightsStatus(True, "Kandinsky 2.2 prior and decoder: " + ", ".join(where for _, where in found))


def trained_status():
    """Whether ``diffseg`` runs here: the Kandinsky 2.2 weights, plus a checkpoint trained by the user."""
    from fsdiff.methods import WeightsStatus

    base = status()
    note = "it also needs PAM/SCM weights trained with `fsdiff train diffseg` (checkpoint=DIR); none are shipped"
    return WeightsStatus(False, f"{base.detail}\n{note}" if not base.ready else note)


__all__ = ["DiffSegPriorSegmenter", "DiffSegSegmenter", "status", "trained_status"]
