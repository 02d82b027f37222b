"""Tiny, randomly initialised stand-ins for the pretrained diffusion models of :mod:`.loading`, for tests.

Each builder creates the SAME diffusers / transformers classes with the SAME config keys as the public
checkpoints (Kandinsky 2.2 prior + decoder, Stable Diffusion 1.5 / 2.1, ControlNet 1.0), with the widths
shrunk (``block_out_channels`` (32, 32, 64, 64) for the Kandinsky UNet, one layer per block, 2-4 attention
heads, a 2-layer CLIP), randomly initialised under an explicit seed, and writes it with ``save_pretrained`` in
the Hub layout (``model_index.json`` plus one subfolder per component). The directories are then read back
through the public loaders of :mod:`fsdiff.diffusion.loading`, exactly as a downloaded checkpoint would be.

What is kept from the public configs: the block types (``ResnetDownsampleBlock2D`` +
``SimpleCrossAttnDownBlock2D`` x3, ``UNetMidBlock2DSimpleCrossAttn``, ``SimpleCrossAttnUpBlock2D`` x3 +
``ResnetUpsampleBlock2D``, i.e. the ``AttnAddedKVProcessor`` attention with image-embedding keys), the
conditioning (``encoder_hid_dim_type="image_proj"``, ``addition_embed_type="image"``), the number of
resolution levels (so the latent is 1/8 of the image and the attention layers sit at 1/2, 1/4 and 1/8 of the
latent, as in the real decoder: 32, 16 and 8 for a 64x64 latent), MoVQ's spatial norm, SD's
``CrossAttnDownBlock2D`` layout (SD 2.1: linear projections and upcast attention) and the schedulers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

TINY_IMAGE_EMBED_DIM = 32
"""Projection width of the tiny CLIP image encoder (1280 in the public prior)."""

TINY_KANDINSKY_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 16,
    "block_out_channels": (32, 32, 64, 64),
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 32,
    "cross_attention_norm": None,
    "down_block_types": (
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": TINY_IMAGE_EMBED_DIM,
    "encoder_hid_dim_type": "image_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": (
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    "upcast_attention": False,
    "use_linear_projection": False,
}
"""Tiny Kandinsky 2.2 decoder UNet: the public config's keys, widths shrunk (public: (384, 768, 1152, 1536),
3 layers per block, head dim 64, cross_attention_dim 768, encoder_hid_dim 1280, 32 groups)."""

TINY_MOVQ: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
    "num_vq_embeddings": 64,
    "block_out_channels": (32, 32, 64, 64),
    "vq_embed_dim": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_type": "spatial",
}
"""Tiny MoVQ (public: (128, 256, 256, 512), 2 layers, 16384 codes); 4 levels, so 8 pixels per latent cell."""

TINY_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": TINY_IMAGE_EMBED_DIM,
    "hidden_act": "gelu",
}
"""Tiny CLIP vision tower with projection (public ViT-bigG/14: 1664 wide, 48 layers, 224 px, 1280-d)."""

TINY_KANDINSKY_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}
"""DDPMScheduler settings of the Kandinsky 2.2 decoder (linear betas 0.00085..0.012, epsilon)."""

KANDINSKY_PRIOR_INDEX: dict[str, Any] = {
    "_class_name": "KandinskyV22PriorPipeline",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "prior": ["diffusers", "PriorTransformer"],
    "scheduler": ["diffusers", "UnCLIPScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}
"""The prior's public model_index.json. Only image_encoder/ and image_processor/ are written (and needed)."""

SD_WORDS = ("a", "real", "shot", "photo", "of", "dog", "cat", "horse", "person", "best", "quality", "extremely",
            "detailed", "low", "bad")
"""Words the tiny CLIP tokenizer encodes as single tokens (everything else falls back to characters)."""


class KandinskyDirs(NamedTuple):
    """The two directories of a (tiny) Kandinsky 2.2 checkpoint."""

    prior: Path
    decoder: Path


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block only (the caller's RNG state is restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_kandinsky_modules(seed: int) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fsdiff.diffusion.loading import _clip_image_processor_class

    with _seeded(seed):
        unet = UNet2DConditionModel(**TINY_KANDINSKY_UNET)
    with _seeded(seed + 1):
        movq = VQModel(**TINY_MOVQ)
    with _seeded(seed + 2):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
    side = TINY_CLIP_VISION["image_size"]
    processor = _clip_image_processor_class()(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True,
        do_normalize=True, do_resize=True, do_rescale=True, do_convert_rgb=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return {"unet": unet, "movq": movq, "scheduler": DDPMScheduler(**TINY_KANDINSKY_SCHEDULER),
            "image_encoder": encoder, "image_processor": processor}


def build_tiny_kandinsky(path: str | os.PathLike[str], seed: int = 0) -> KandinskyDirs:
    """Write a tiny Kandinsky 2.2 prior (``path/prior``) and decoder (``path/decoder``) in the Hub layout."""
    from diffusers import KandinskyV22Pipeline

    root = Path(path)
    mods = _tiny_kandinsky_modules(seed)
    decoder = root / "decoder"
    KandinskyV22Pipeline(unet=mods["unet"], scheduler=mods["scheduler"], movq=mods["movq"]).save_pretrained(decoder)
    prior = root / "prior"
    mods["image_encoder"].save_pretrained(prior / "image_encoder")
    mods["image_processor"].save_pretrained(prior / "image_processor")
    index = dict(KANDINSKY_PRIOR_INDEX)
    index["_diffusers_version"] = _diffusers_version()
    (prior / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return KandinskyDirs(prior=prior, decoder=decoder)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# --------------------------------------------------------------------------------------------------------------
# Stable Diffusion
# --------------------------------------------------------------------------------------------------------------


def tiny_sd_unet_config(version: str = "1.5") -> dict[str, Any]:
    """Config of the tiny SD UNet: SD 1.5 layout, or SD 2.1's (linear projections, upcast attention)."""
    cfg: dict[str, Any] = {
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": (32, 64, 64),
        "center_input_sample": False,
        "cross_attention_dim": 32,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "upcast_attention": False,
        "use_linear_projection": False,
    }
    if version == "2.1":
        cfg.update(attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, sample_size=96)
    elif version != "1.5":
        raise ValueError(f"version must be '1.5' or '2.1', got {version!r}")
    return cfg


TINY_SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 0.18215,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
"""Tiny SD VAE (public: (128, 256, 512, 512), 2 layers); 4 levels, so 8 pixels per latent cell."""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_clip_vocab(folder: str | os.PathLike[str], words: tuple[str, ...] = SD_WORDS) -> Path:
    """Write a tiny CLIP BPE vocabulary (``vocab.json`` + ``merges.txt``) into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in words:
        if len(word) < 2:
            continue
        current = word[0]
        for i in range(1, len(word)):
            nxt = word[i] + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def tiny_clip_tokenizer() -> Any:
    """A tiny ``CLIPTokenizer`` built from a locally written vocab.json + merges.txt (max length 77)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_vocab(tmp)
        tok = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                            model_max_length=77)
    return tok


def _tiny_sd_modules(version: str, seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_sd_unet_config(version))
    with _seeded(seed + 1):
        vae = AutoencoderKL(**TINY_SD_VAE)
    text_cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=len(tokenizer), projection_dim=32,
        hidden_act="quick_gelu" if version == "1.5" else "gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(text_cfg)
    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "steps_offset": 1}
    if version == "1.5":
        scheduler = PNDMScheduler(skip_prk_steps=True, **common)
    else:
        scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_tiny_stable_diffusion(path: str | os.PathLike[str], version: str = "1.5", seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion ``version`` ('1.5' or '2.1') pipeline directory at ``path``; returns it."""
    from diffusers import StableDiffusionPipeline

    mods = _tiny_sd_modules(version, seed)
    pipe = StableDiffusionPipeline(**mods, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(path)
    pipe.save_pretrained(out)
    # The public SD repositories ship the slow-tokenizer files (vocab.json, merges.txt, special_tokens_map.json,
    # tokenizer_config.json) and no tokenizer.json: mirror that, so loading goes through the same files.
    tok_dir = out / "tokenizer"
    write_tiny_clip_vocab(tok_dir)
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return out


def build_tiny_controlnet(
    path: str | os.PathLike[str], version: str = "1.5", seed: int = 0, randomize_zero_convs: bool = True
) -> Path:
    """Write a tiny ``ControlNetModel`` matching :func:`build_tiny_stable_diffusion`'s UNet (same seed) at ``path``.

    Built with ``ControlNetModel.from_unet`` (weights copied from the UNet, as when training a ControlNet) with
    conditioning channels (8, 16, 16, 32) (public: (16, 32, 96, 256); both downsample 8x). The zero-initialised
    output convolutions are given small random weights (``randomize_zero_convs``), so tests can see the control.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_sd_unet_config(version))
    with _seeded(seed + 3):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        if randomize_zero_convs:
            convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
            with torch.no_grad():
                for conv in convs:
                    conv.weight.normal_(0.0, 0.05)
                    conv.bias.normal_(0.0, 0.05)
    out = Path(path)
    net.save_pretrained(out)
    return out
