"""Loading the diffusion models (fsdiff.diffusion.loading) through the tiny Hub-layout stand-ins
(fsdiff.diffusion.tiny): component classes and configs, freezing, dtype choice, wrong-kind and offline errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsdiff.diffusion import loading
from fsdiff.diffusion.loading import (
    KANDINSKY_DECODER_ID,
    KANDINSKY_PRIOR_ID,
    MissingModelError,
    classify_model,
    default_dtype,
    download_command,
    hub_reachable,
    load_controlnet,
    load_kandinsky,
    load_stable_diffusion,
)
from fsdiff.diffusion.tiny import (
    KandinskyDirs,
    build_tiny_controlnet,
    build_tiny_kandinsky,
    build_tiny_stable_diffusion,
)
from fsdiff.errors import FsdiffError

pytest.importorskip("diffusers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")
pytest.importorskip("transformers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run fastest single-threaded (and do not thrash when other jobs share the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny Kandinsky 2.2 prior + decoder, SD 1.5, SD 2.1 and a ControlNet, written in the Hub layout."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "kandinsky": build_tiny_kandinsky(root / "kandinsky", seed=0),
        "sd15": build_tiny_stable_diffusion(root / "sd15", version="1.5", seed=0),
        "sd21": build_tiny_stable_diffusion(root / "sd21", version="2.1", seed=0),
        "controlnet": build_tiny_controlnet(root / "controlnet", version="1.5", seed=0),
    }


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network and an empty Hugging Face cache; FSDIFF_MODEL_DIR unset."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(loading.MODEL_DIR_ENV, raising=False)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# dtype / device
# ----------------------------------------------------------------------------------------------------------------


def test_default_dtype_is_bf16_on_cpu_and_fp16_on_cuda() -> None:
    assert default_dtype("cpu") == torch.bfloat16
    assert default_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(FsdiffError, match="not a torch device"):
        default_dtype("gpu0")


# ----------------------------------------------------------------------------------------------------------------
# Kandinsky 2.2
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_kandinsky_matches_public_layout(tiny: dict[str, object]) -> None:
    dirs = tiny["kandinsky"]
    assert isinstance(dirs, KandinskyDirs)
    index = json.loads((dirs.decoder / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22Pipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["movq"] == ["diffusers", "VQModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    prior_index = json.loads((dirs.prior / "model_index.json").read_text())
    assert prior_index["_class_name"] == "KandinskyV22PriorPipeline"
    assert prior_index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    for sub in ("image_encoder/config.json", "image_encoder/model.safetensors",
                "image_processor/preprocessor_config.json"):
        assert (dirs.prior / sub).is_file(), sub
    ucfg = json.loads((dirs.decoder / "unet" / "config.json").read_text())
    assert ucfg["encoder_hid_dim_type"] == "image_proj" and ucfg["addition_embed_type"] == "image"
    assert ucfg["down_block_types"][1:] == ["SimpleCrossAttnDownBlock2D"] * 3
    assert ucfg["mid_block_type"] == "UNetMidBlock2DSimpleCrossAttn"
    assert ucfg["up_block_types"][:3] == ["SimpleCrossAttnUpBlock2D"] * 3
    assert ucfg["only_cross_attention"] is False and ucfg["in_channels"] == 4 and ucfg["out_channels"] == 8
    assert classify_model(index, ucfg) == "kandinsky-2.2-decoder"


def test_load_kandinsky_frozen_default_bf16(tiny: dict[str, object]) -> None:
    dirs = tiny["kandinsky"]
    parts = load_kandinsky(dirs.prior, dirs.decoder)
    assert parts.dtype == torch.bfloat16 and parts.device == torch.device("cpu")
    for module in (parts.unet, parts.movq, parts.image_encoder):
        assert _frozen(module)
        assert next(module.parameters()).dtype == torch.bfloat16
    assert type(parts.scheduler).__name__ == "DDPMScheduler"
    assert type(parts.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert parts.movq_scale_factor == 8 and parts.embed_dim == 32 and parts.num_image_tokens == 32
    procs = {type(p).__name__ for p in parts.unet.attn_processors.values()}
    assert procs == {"AttnAddedKVProcessor2_0"}
    with pytest.raises(dataclass_frozen_error()):
        parts.unet = None  # type: ignore[misc]


def dataclass_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_kandinsky_end_to_end_fp32(tiny: dict[str, object]) -> None:
    """Image -> CLIP image embedding -> UNet on a MoVQ latent -> MoVQ decode, at float32."""
    dirs = tiny["kandinsky"]
    parts = load_kandinsky(dirs.prior, dirs.decoder, dtype=torch.float32)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pix = parts.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = parts.image_encoder(pix).image_embeds
        assert emb.shape == (1, 32)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        latent = parts.movq.encode(x).latents
        assert latent.shape == (1, 4, 8, 8)
        noise = parts.unet(latent, 100, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample
        assert noise.shape == (1, 8, 8, 8) and torch.isfinite(noise).all()
        out = parts.movq.decode(latent, force_not_quantize=True).sample
        assert out.shape == (1, 3, 64, 64)


def test_builders_are_seeded(tmp_path: Path) -> None:
    a = build_tiny_kandinsky(tmp_path / "a", seed=3)
    b = build_tiny_kandinsky(tmp_path / "b", seed=3)
    c = build_tiny_kandinsky(tmp_path / "c", seed=4)
    fa = (a.decoder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert fa == (b.decoder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert fa != (c.decoder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion and ControlNet
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, scheduler", [("sd15", "PNDMScheduler"), ("sd21", "DDIMScheduler")])
def test_load_stable_diffusion(tiny: dict[str, object], version: str, scheduler: str) -> None:
    parts = load_stable_diffusion(tiny[version], dtype="fp32")
    for module in (parts.unet, parts.vae, parts.text_encoder):
        assert _frozen(module) and next(module.parameters()).dtype == torch.float32
    assert type(parts.scheduler).__name__ == scheduler
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.tokenizer).__name__ == "CLIPTokenizer"
    assert parts.pipeline_class == "StableDiffusionPipeline" and parts.vae_scale_factor == 8
    assert parts.family == "custom"
    assert parts.unet.config.use_linear_projection is (version == "sd21")
    assert parts.unet.config.upcast_attention is (version == "sd21")
    # The public SD tokenizer layout: vocab.json + merges.txt, no tokenizer.json.
    tok_dir = Path(tiny[version]) / "tokenizer"  # type: ignore[arg-type]
    assert (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()
    assert not (tok_dir / "tokenizer.json").exists()
    ids = parts.tokenizer("a real shot photo of dog,, best quality", padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == parts.tokenizer.bos_token_id
    assert parts.tokenizer.convert_ids_to_tokens(ids[0, 1:5].tolist()) == ["a</w>", "real</w>", "shot</w>", "photo</w>"]
    with torch.no_grad():
        text = parts.text_encoder(ids).last_hidden_state
        assert text.shape == (1, 77, 32)
        eps = parts.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=text).sample
        assert eps.shape == (1, 4, 8, 8)


def test_load_controlnet_matches_unet(tiny: dict[str, object], tmp_path: Path) -> None:
    sd = load_stable_diffusion(tiny["sd15"], dtype=torch.float32)
    net = load_controlnet(tiny["controlnet"], unet=sd.unet, dtype=torch.float32)
    assert type(net).__name__ == "ControlNetModel" and _frozen(net)
    cond = torch.rand(1, 3, 64, 64)
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        out = net(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=text, controlnet_cond=cond)
        res = out.down_block_res_samples
        eps = sd.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=text, down_block_additional_residuals=res,
                      mid_block_additional_residual=out.mid_block_res_sample).sample
    n_blocks, layers = len(sd.unet.config.block_out_channels), sd.unet.config.layers_per_block
    assert len(res) == 1 + n_blocks * layers + (n_blocks - 1)  # conv_in + resnets + downsamplers
    assert eps.shape == (1, 4, 8, 8)
    assert any(r.abs().max() > 0 for r in res), "randomised zero convs give a visible control"
    # A ControlNet for another UNet width is refused before loading weights.
    bad = tmp_path / "bad_controlnet"
    shutil.copytree(Path(tiny["controlnet"]), bad)  # type: ignore[arg-type]
    cfg = json.loads((bad / "config.json").read_text())
    cfg["cross_attention_dim"] = 768
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FsdiffError, match="cross_attention_dim"):
        load_controlnet(bad, unet=sd.unet)
    with pytest.raises(FsdiffError, match="ControlNetModel is expected"):
        load_controlnet(Path(tiny["sd15"]) / "unet")  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------------------------
# Wrong kind
# ----------------------------------------------------------------------------------------------------------------


def test_sd_directory_refused_as_kandinsky_decoder(tiny: dict[str, object]) -> None:
    dirs = tiny["kandinsky"]
    with pytest.raises(FsdiffError) as err:
        load_kandinsky(dirs.prior, tiny["sd15"])
    msg = str(err.value)
    assert "decoder" in msg and "stable diffusion" in msg and "StableDiffusionPipeline" in msg
    assert "Kandinsky 2.2 decoder" in msg and "image_proj" in msg


def test_kandinsky_directories_refused_as_stable_diffusion(tiny: dict[str, object]) -> None:
    dirs = tiny["kandinsky"]
    with pytest.raises(FsdiffError, match=r"kandinsky 2\.2 decoder.*Stable Diffusion 1\.5 or 2\.1"):
        load_stable_diffusion(dirs.decoder)
    with pytest.raises(FsdiffError, match=r"kandinsky 2\.2 prior.*Stable Diffusion"):
        load_stable_diffusion(dirs.prior)


def test_prior_and_decoder_swapped(tiny: dict[str, object]) -> None:
    dirs = tiny["kandinsky"]
    with pytest.raises(FsdiffError, match=r"decoder: .*holds a kandinsky 2\.2 prior"):
        load_kandinsky(dirs.prior, dirs.prior)
    with pytest.raises(FsdiffError, match=r"prior: .*holds a kandinsky 2\.2 decoder"):
        load_kandinsky(dirs.decoder, dirs.decoder)


def test_prior_decoder_width_mismatch(tiny: dict[str, object], tmp_path: Path) -> None:
    dirs = tiny["kandinsky"]
    prior = tmp_path / "prior"
    shutil.copytree(dirs.prior, prior)
    cfg_file = prior / "image_encoder" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["projection_dim"] = 768
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FsdiffError, match="projects to 768 dimensions.*encoder_hid_dim=32"):
        load_kandinsky(prior, dirs.decoder)


def test_classify_model_public_configs() -> None:
    sd = {"encoder_hid_dim_type": None, "addition_embed_type": None, "cross_attention_dim": 768, "in_channels": 4}
    kd = {"encoder_hid_dim_type": "image_proj", "addition_embed_type": "image", "in_channels": 4}
    assert classify_model({"_class_name": "StableDiffusionPipeline"}, sd) == "stable-diffusion"
    assert classify_model({"_class_name": "KandinskyV22Pipeline"}, kd) == "kandinsky-2.2-decoder"
    assert classify_model(None, dict(kd, in_channels=9)) == "kandinsky-2.2-variant"
    assert classify_model(None, dict(kd, addition_embed_type="image_hint")) == "kandinsky-2.2-variant"
    assert classify_model({"_class_name": "KandinskyPipeline"}, None) == "kandinsky-2.1"
    assert classify_model(None, {"encoder_hid_dim_type": "text_image_proj"}) == "kandinsky-2.1"
    assert classify_model({"_class_name": "StableDiffusionXLPipeline"}, None) == "sdxl"
    assert classify_model({"_class_name": "KandinskyV22PriorPipeline"}, None) == "kandinsky-2.2-prior"


# ----------------------------------------------------------------------------------------------------------------
# Missing / offline
# ----------------------------------------------------------------------------------------------------------------


def test_offline_hub_ids_name_both_repositories_and_a_command(offline: Path) -> None:
    assert hub_reachable() is False
    with pytest.raises(MissingModelError) as err:
        load_kandinsky()
    msg = str(err.value)
    for repo in (KANDINSKY_PRIOR_ID, KANDINSKY_DECODER_ID):
        assert f"hf download {repo} " in msg and f"--local-dir models/{repo}" in msg
        assert f"huggingface-cli download {repo} " in msg
    for needed in ("image_encoder/", "image_processor/", "unet/", "movq/", "scheduler/", "model_index.json"):
        assert needed in msg
    assert "FSDIFF_MODEL_DIR" in msg and "HF_HUB_OFFLINE" in msg
    assert "prior=" in msg and "decoder=" in msg


def test_offline_stable_diffusion_message(offline: Path) -> None:
    with pytest.raises(MissingModelError) as err:
        load_stable_diffusion("2.1")
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-2-1" in msg and "text_encoder/" in msg and "tokenizer/" in msg
    assert "hf download stabilityai/stable-diffusion-2-1" in msg


def test_missing_directory_and_missing_subfolder(tiny: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match=r"(?s)decoder='/nonexistent/k22': directory not found.*hf download"):
        load_kandinsky(tiny["kandinsky"].prior, "/nonexistent/k22")  # type: ignore[union-attr]
    partial = tmp_path / "decoder"
    shutil.copytree(tiny["kandinsky"].decoder, partial)  # type: ignore[union-attr]
    shutil.rmtree(partial / "movq")
    with pytest.raises(MissingModelError, match=r"(?s)subfolder movq/ is missing.*movq/\*"):
        load_kandinsky(tiny["kandinsky"].prior, partial)  # type: ignore[union-attr]
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FsdiffError, match="is a file"):
        load_stable_diffusion(tmp_path / "file.txt")


def test_model_dir_env_finds_hub_ids(tiny: dict[str, object], offline: Path, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    root = tmp_path / "models"
    dirs = tiny["kandinsky"]
    (root / "kandinsky-community").mkdir(parents=True)
    (root / KANDINSKY_PRIOR_ID).symlink_to(dirs.prior, target_is_directory=True)  # type: ignore[union-attr]
    (root / "kandinsky-2-2-decoder").symlink_to(dirs.decoder, target_is_directory=True)  # type: ignore[union-attr]
    monkeypatch.setenv(loading.MODEL_DIR_ENV, str(root))
    parts = load_kandinsky(dtype=torch.float32)
    assert parts.prior_source == str(Path(dirs.prior).resolve())  # type: ignore[union-attr]
    assert parts.decoder_source == str(Path(dirs.decoder).resolve())  # type: ignore[union-attr]


def test_download_command_format() -> None:
    cmd = download_command(KANDINSKY_DECODER_ID, "kandinsky-decoder", "/data/k22")
    assert cmd.startswith(f"hf download {KANDINSKY_DECODER_ID} ")
    assert '--include "unet/*"' in cmd and '--include "movq/*"' in cmd and cmd.endswith("--local-dir /data/k22")
    legacy = download_command(KANDINSKY_PRIOR_ID, "kandinsky-prior", "/data/p", legacy=True)
    assert legacy.startswith(f"huggingface-cli download {KANDINSKY_PRIOR_ID} --include ")
    assert '"image_encoder/*"' in legacy and '"image_processor/*"' in legacy
