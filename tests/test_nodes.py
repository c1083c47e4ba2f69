"""The ComfyUI nodes' logic called directly on real tensors, without the host (CI).

With ``COMFYUI_PATH`` set, tests/test_comfyui_native.py runs it inside ComfyUI's own sampling and
tests/test_comfyui_server.py inside a real ComfyUI server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet, randomize
from diffusers import UNet2DConditionModel

from lookback_core.config import LookBackConfig, preset
from lookback_core.sd15 import SHIPPED_CONFIG_DIR, load_sd15
from lookback_core.sites import ldm_site_channels, site_channels
from lookback_core.temporal_unet import TemporalModules, create_lookback_unet
from lookback_core.video_io import read_metadata, read_video
from lookback_core.weights import TemporalHeader, TemporalWeightsError
from nodes import host, lookback_patch
from nodes.lookback_patch import LookBackPatches, SiteMarker
from nodes.native import LookBackExtendVideo, LookBackImageToVideo, LookBackJoinVideo, read_weights
from nodes.own_config_checkpoint import carries_own_configs, comfy_settings
from nodes.toy import LookBackToyStartImage
from nodes.video import LookBackVideoCombine

REPO = Path(__file__).parents[1]
SD15_LDM = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2]}


def test_pack_imports_the_way_comfyui_loads_it() -> None:
    # ComfyUI imports custom_nodes/<any folder name>/__init__.py as a package of that name.
    spec = importlib.util.spec_from_file_location(
        "comfyui-lookback-i2v", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    try:
        spec.loader.exec_module(pack)
    finally:
        del sys.modules[spec.name]
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) == {
        "LookBackCheckpointLoader", "LookBackToyStartImage", "LookBackWeightsLoader", "LookBackApply", "LookBackImageToVideo", "LookBackExtendVideo", "LookBackJoinVideo",
        "LookBackVideoCombine",
    }  # fmt: skip
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "Look-Back I2V" and callable(getattr(cls(), cls.FUNCTION)), name
        inputs = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, spec_ in inputs.get(group, {}).items():
                assert spec_[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_ldm_site_channels_match_the_diffusers_unet() -> None:
    tiny = make_tiny_unet()
    config = tiny.config
    assert ldm_site_channels(config.block_out_channels[0], [c // config.block_out_channels[0] for c in
                             config.block_out_channels], config.layers_per_block) == site_channels(tiny)  # fmt: skip
    with torch.device("meta"):
        full = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR / "unet"))
    sd15 = ldm_site_channels(**SD15_LDM)
    assert sd15 == site_channels(full) and len(sd15) == 21


def test_sdxl_sites_are_refused_naming_the_mismatch() -> None:
    sd15 = ldm_site_channels(**SD15_LDM)
    facts = {"context_dim": 768, "latent_scale": 0.18215}
    weights = TemporalHeader(preset("light").with_channels(sd15), training=facts)
    sdxl = ldm_site_channels(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=2)
    problems = lookback_patch.unet_problems(weights, sdxl, context_dim=2048, latent_scale=0.13025)
    assert any("site 'input.10' does not exist in this UNet" in p for p in problems)
    assert "site 'output.3' has 640 channels in this UNet but 1280 in the weights" in problems
    assert "it was trained with a text context of 768 channels; this model's has 2048" in problems
    assert any("trained on latents scaled by 0.18215" in p and "scales by 0.13025" in p for p in problems)
    assert lookback_patch.unet_problems(weights, sd15, 768, 0.18215) == []
    # weights that do not record a fact (written before it was recorded) are not checked on it
    assert lookback_patch.unet_problems(replace(weights, training={}), sd15, 2048, 0.13025) == []
    # ComfyUI's unet_config: an SD1.5 UNet's gives the 21 sites, a DiT's (Flux) none
    sd15_config = {**SD15_LDM, "context_dim": 768, "use_linear_in_transformer": False}
    assert lookback_patch.unet_site_channels(sd15_config) == ldm_site_channels(**SD15_LDM)
    assert lookback_patch.unet_site_channels({"image_model": "flux", "in_channels": 16}) is None


@pytest.fixture(scope="module")
def temporal() -> TemporalModules:
    modules = create_lookback_unet(make_tiny_unet(), LookBackConfig(depth=2, kernel=3)).temporal
    randomize(modules, scale=0.05)
    return modules


def _hidden(temporal: TemporalModules, site: str, batch: int, seed: int = 0) -> torch.Tensor:
    n = temporal.config.channels[site]
    return torch.randn(batch, n, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_patches_apply_each_site_at_its_comfyui_patch_point(temporal) -> None:
    patches, frames = LookBackPatches(temporal), 3
    options = {"cond_or_uncond": [0]}
    for site in temporal.config.sites:
        h = _hidden(temporal, site, frames)
        expected = temporal[site](h, frames)
        assert not torch.allclose(expected, h)
        kind, _, k = site.partition(".")
        if kind == "input":
            got = patches.input_block(h, {**options, "block": ("input", int(k))})
        elif kind == "middle":
            out = patches.middle_block({"h": h, "x": "kept", "transformer_options": options})
            assert out["x"] == "kept"
            got = out["h"]
        else:  # the output of block K is patched when block K+1 starts
            hsp = torch.zeros(1)
            got, hsp_out = patches.output_block(h, hsp, {**options, "block": ("output", int(k) + 1)})
            assert hsp_out is hsp
        torch.testing.assert_close(got, expected)
    last = SiteMarker("output.11")
    h = _hidden(temporal, "output.11", frames)
    torch.testing.assert_close(
        patches.after_last_block(last, h, None, None, options), temporal["output.11"](h, frames)
    )
    torch.testing.assert_close(last(h), h)  # unpatched: passes through
    # blocks without a site pass through untouched: conv_in, the down-samplers, output block 0's start
    for block in (("input", 0), ("input", 3), ("input", 6)):
        h = _hidden(temporal, "input.1", frames)
        assert patches.input_block(h, {**options, "block": block}) is h
    assert patches.output_block(h, None, {**options, "block": ("output", 0)})[0] is h


def test_patches_fold_frames_per_conditioning_chunk_and_never_mix_chunks(temporal) -> None:
    patches, frames, site = LookBackPatches(temporal), 4, "output.5"
    chunks = [_hidden(temporal, site, frames, seed) for seed in range(3)]
    options = {"cond_or_uncond": [0, 1, 0], "block": ("output", 6)}
    got, _ = patches.output_block(torch.cat(chunks), None, options)
    torch.testing.assert_close(got, torch.cat([temporal[site](c, frames) for c in chunks]))
    # the same batch read as one chunk of 12 frames would differ: the chunks really are kept apart
    assert not torch.allclose(got, temporal[site](torch.cat(chunks), 3 * frames))
    with pytest.raises(ValueError, match="cannot hold 3 conditioning chunks"):
        patches.output_block(torch.cat(chunks)[:-1], None, options)


def test_patches_run_the_modules_in_their_dtype_and_return_the_callers(temporal) -> None:
    h = _hidden(temporal, "middle", 2).double()
    out = LookBackPatches(temporal).middle_block({"h": h, "transformer_options": {}})["h"]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), temporal["middle"](h.float(), 2))


def test_start_latent_pins_frame_zero_and_starts_the_rest_from_zeros() -> None:
    start = torch.randn(1, 4, 8, 6)
    latent = lookback_patch.start_video_latent(start, 5)
    assert latent["samples"].shape == (5, 4, 8, 6) and torch.equal(latent["samples"][0], start[0])
    assert not latent["samples"][1:].any()
    assert latent["noise_mask"].shape == (5, 1, 8, 6)
    assert lookback_patch.pinned_frames(latent["noise_mask"]).tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError, match="frames must be at least 2"):
        lookback_patch.start_video_latent(start, 1)


def test_a_long_video_continues_from_pinned_context_and_joins_without_repeats() -> None:
    video = {"samples": torch.randn(5, 4, 8, 8), "noise_mask": torch.ones(5, 1, 8, 8)}
    (chunk,) = LookBackExtendVideo().extend(video, frames=4, context_frames=2)
    assert chunk["samples"].shape == (6, 4, 8, 8)
    assert torch.equal(chunk["samples"][:2], video["samples"][3:]) and not chunk["samples"][2:].any()
    assert lookback_patch.pinned_frames(chunk["noise_mask"]).tolist() == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    sampled = {
        **chunk,
        "samples": torch.cat([chunk["samples"][:2], torch.randn(4, 4, 8, 8)]),
    }  # as KSampler returns it
    (joined,) = LookBackJoinVideo().join(video, sampled)
    assert torch.equal(joined["samples"], torch.cat([video["samples"], sampled["samples"][2:]]))
    assert set(joined) == {"samples"}
    with pytest.raises(ValueError, match="context_frames must be 1..5"):
        LookBackExtendVideo().extend(video, frames=4, context_frames=6)
    with pytest.raises(ValueError, match="cannot follow"):
        LookBackJoinVideo().join(video, {"samples": torch.randn(3, 4, 8, 6)})
    # a Set Latent Noise Mask node in between: its mask covers other frames
    remasked = {**sampled, "noise_mask": torch.ones(1, 1, 8, 8)}
    with pytest.raises(ValueError, match="its noise_mask covers 1 frames but it holds 6"):
        LookBackJoinVideo().join(video, remasked)


def test_pinned_frames_are_only_those_the_mask_keeps_whole() -> None:
    mask = torch.ones(4, 4, 8, 8)
    mask[0] = 0
    mask[2, :, :4] = 0  # partly kept: ordinary inpainting, not a pinned frame
    assert lookback_patch.pinned_frames(mask).tolist() == [True, False, False, False]


def test_colour_match_sets_the_new_frames_statistics_to_the_first_pinned_frames() -> None:
    latent = torch.randn(5, 4, 8, 8)
    latent[1] = latent[1] * 3 + 2  # the second pinned frame is not the reference
    mask = torch.ones(5, 4, 8, 8)
    mask[:2] = 0
    sampled = torch.randn(5, 4, 8, 8) * 2 + 1
    run = lambda match: lookback_patch.sampler_sample_wrapper(  # noqa: E731
        lambda *args: sampled.clone(), None, None, {"model_options": {}}, None, None, latent, mask, True,
        colour_match=match,
    )  # fmt: skip
    plain, matched = run("off"), run("first_frame")
    assert torch.equal(plain[:2], latent[:2]) and torch.equal(plain[2:], sampled[2:])
    assert torch.equal(matched[:2], latent[:2])
    for stat in (lambda x: x.mean(dim=(-2, -1)), lambda x: x.std(dim=(-2, -1))):
        torch.testing.assert_close(stat(matched[2:]), stat(latent[:1]).expand(3, 4), atol=1e-5, rtol=1e-5)


def test_pinned_model_input_is_the_clean_latent_after_the_models_input_scaling() -> None:
    x = torch.randn(3, 4, 8, 8) * 14.6
    start = torch.randn(3, 4, 8, 8)
    sigma = torch.full((3,), 14.6)
    c_in = (
        1 / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1) * torch.ones_like(x)
    )  # SD1.5 (eps): 1 / sqrt(sigma^2 + 1)
    pinned = torch.tensor([True, False, False])
    out = lookback_patch.pin_model_input(x, start, pinned, c_in)
    torch.testing.assert_close(out[0] * c_in[0], start[0])  # what the UNet sees
    assert torch.equal(out[1:], x[1:])


class _TinyVAE:
    """ComfyUI's VAE.encode contract on the tiny diffusers VAE: IMAGE [b, h, w, 3] -> raw latent."""

    def __init__(self, vae) -> None:
        self.vae, self.seen = vae, []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(pixels.shape))
        with torch.no_grad():
            return self.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean


def test_image_to_video_encodes_one_start_image_cropped_to_multiples_of_8(tiny_files, caplog) -> None:
    vae = _TinyVAE(load_sd15(tiny_files["checkpoint"], config_dir=tiny_files["config_dir"]).vae)
    image = torch.rand(1, 70, 68, 4)  # RGBA, sides not multiples of 8
    (latent,) = LookBackImageToVideo().encode(vae, image, 6)
    assert vae.seen == [(1, 64, 64, 3)] and "centre-cropped to 64x64" in caplog.text
    assert latent["samples"].shape == (6, 4, 8, 8) and latent["noise_mask"][0].max() == 0
    with pytest.raises(ValueError, match="image: a batch of 2 images"):
        LookBackImageToVideo().encode(vae, torch.rand(2, 64, 64, 3), 6)
    with pytest.raises(ValueError, match="too small"):
        LookBackImageToVideo().encode(vae, torch.rand(1, 40, 64, 3), 6)
    with pytest.raises(
        ValueError, match=r"image: an IMAGE is \[batch, height, width, 3\], got shape \[64, 64, 3\]"
    ):
        LookBackImageToVideo().encode(vae, torch.rand(64, 64, 3), 6)


def test_reading_missing_weights_names_the_file(tmp_path) -> None:
    with pytest.raises(TemporalWeightsError, match="nowhere.safetensors.*cannot be read"):
        read_weights(tmp_path / "nowhere.safetensors")


def test_toy_checkpoint_configs_translate_to_comfyuis_sd15_classes(tiny_files, tmp_path) -> None:
    from lookback_core.checkpoint_file import checkpoint_metadata
    from lookback_core.sd15 import EMBEDDED_CONFIGS_KEY, ModelConfigs
    from toyworld.model import TOY_CHECKPOINT

    configs = ModelConfigs.from_metadata(
        TOY_CHECKPOINT, checkpoint_metadata(TOY_CHECKPOINT)[EMBEDDED_CONFIGS_KEY]
    )
    settings = comfy_settings(TOY_CHECKPOINT, configs)
    widths = configs.configs["vae"]["block_out_channels"]
    assert settings.vae_ddconfig["ch"] * np.array(settings.vae_ddconfig["ch_mult"]) == pytest.approx(widths)
    assert settings.num_heads == configs.configs["unet"]["attention_head_dim"]
    assert settings.latent_scale == configs.configs["vae"]["scaling_factor"] != 0.18215
    assert settings.prediction_type == "v_prediction"
    assert settings.text_config["hidden_size"] == configs.configs["text_encoder"]["hidden_size"]
    # what ComfyUI's classes would compute otherwise is named, field by field
    configs.configs["vae"]["norm_num_groups"] = 4
    configs.configs["unet"]["act_fn"] = "gelu"
    with pytest.raises(ValueError, match=r"sd15_toy.safetensors: cannot be built from ComfyUI's SD1.5 classes: "
                       r"the UNet's act_fn is 'gelu'.*the VAE's norm_num_groups is 4, ComfyUI's classes compute 32"):  # fmt: skip
        comfy_settings(TOY_CHECKPOINT, configs)
    assert carries_own_configs(TOY_CHECKPOINT) and not carries_own_configs(tiny_files["checkpoint"])
    (tmp_path / "x.ckpt").write_bytes(b"")
    assert not carries_own_configs(tmp_path / "x.ckpt")


def test_toy_start_image_is_a_held_out_first_frame_and_its_caption() -> None:
    from toyworld import world

    image, caption = LookBackToyStartImage().make(3)
    clip = world.make_clip(world.HELD_OUT_SEED + 3)
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(clip.frames[0]))
    assert caption == clip.caption and caption.startswith("a ")


def test_weights_are_read_once_until_the_file_changes(tiny_files, tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(Path(tiny_files["weights"]).read_bytes())
    first = read_weights(path)
    assert read_weights(path) is first and first.name == "w.safetensors"
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in first.temporal.parameters())
    assert (
        repr(first) == "LookBackWeights('w.safetensors', base not recorded, 21 sites)"
    )  # never the module tree
    path.write_bytes(path.read_bytes())  # same bytes, a newer file
    os.utime(path, ns=(1, 1))
    assert read_weights(path) is not first
    path.write_bytes(b"not weights")
    with pytest.raises(TemporalWeightsError, match="w.safetensors"):
        read_weights(path)


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("video/h264-mp4", ".mp4"), ("image/gif", ".gif"), ("image/webp", ".webp")]
)
def test_video_combine_writes_numbered_files_with_the_workflow(tmp_path, monkeypatch, fmt, suffix) -> None:
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    frames = torch.rand(5, 48, 64, 3)
    workflow = {"nodes": [{"id": 1, "type": "LookBackSampler"}]}
    node = LookBackVideoCombine()
    first = node.combine(
        frames, 8.0, "videos/LookBack", fmt, 0, prompt={"1": {}}, extra_pnginfo={"workflow": workflow}
    )
    second = node.combine(frames, 8.0, "videos/LookBack", fmt, 0)
    assert first["ui"]["images"][0] == {
        "filename": f"LookBack_00001{suffix}",
        "subfolder": "videos",
        "type": "output",
    }
    assert second["ui"]["images"][0]["filename"] == f"LookBack_00002{suffix}"
    path, video = first["result"]  # one value per output; ComfyUI's VIDEO only inside ComfyUI
    assert len(node.RETURN_TYPES) == 2 and video is None  # (tests/test_comfyui_server.py)
    path = Path(path)
    assert path == tmp_path / "videos" / f"LookBack_00001{suffix}"
    assert read_video(path).shape == (5, 48, 64, 3)
    metadata = read_metadata(path)
    assert json.loads(metadata["workflow"]) == workflow and json.loads(metadata["prompt"]) == {"1": {}}


def test_video_combine_refuses_a_prefix_outside_the_output_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path / "out"))
    with pytest.raises(ValueError, match="outside the output folder"):
        LookBackVideoCombine().combine(torch.rand(2, 8, 8, 3), 8.0, "../escape", "image/gif", 0)
    assert not (tmp_path / "escape_00001.gif").exists()


@pytest.mark.parametrize("prefix", ["take[1]", "shot*", "what?", "[abc]"])
def test_video_combine_numbers_prefixes_with_glob_characters_literally(tmp_path, monkeypatch, prefix) -> None:
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    node = LookBackVideoCombine()
    names = [
        Path(node.combine(torch.rand(2, 8, 8, 3), 8.0, prefix, "image/gif", 0)["result"][0]).name
        for _ in range(3)
    ]
    assert names == [f"{prefix}_0000{i}.gif" for i in (1, 2, 3)]


def test_video_combine_keeps_frame_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    levels = torch.linspace(0, 1, 4)
    frames = levels[:, None, None, None].expand(4, 16, 16, 3).contiguous()
    out = LookBackVideoCombine().combine(frames, 4.0, "order", "image/webp", 0)
    video = read_video(out["result"][0]).astype(np.float32).mean(axis=(1, 2, 3))
    assert np.all(np.diff(video) > 40)


def test_sampling_past_the_weights_horizon_warns_how_to_chunk(caplog) -> None:
    calls = []

    def executor(*args):
        calls.append(args)
        return torch.zeros(3)

    for frames, horizon, warned in ((16, 16, False), (17, 16, True), (40, None, False)):
        caplog.clear()
        latent = torch.zeros(frames, 4, 8, 8)
        lookback_patch.sampler_sample_wrapper(
            executor,
            None,
            None,
            {"model_options": {}},
            None,
            None,
            latent,
            None,
            True,
            horizon=horizon,
            depth=3,
            context=5,
        )
        assert ("more than these weights were checked for (16)" in caplog.text) is warned
        assert ("Look-Back Extend Video (context_frames 5, frames 11)" in caplog.text) is warned
    assert len(calls) == 3  # sampled as asked every time
    caplog.clear()  # weights that record no context: their look-back depth
    lookback_patch.sampler_sample_wrapper(
        executor, None, None, {"model_options": {}}, None, None, torch.zeros(17, 4, 8, 8), None, True,
        horizon=16, depth=3,
    )  # fmt: skip
    assert "Look-Back Extend Video (context_frames 3, frames 13)" in caplog.text


@pytest.mark.parametrize(("frames", "rows", "cols"), [(16, 4, 4), (5, 2, 3), (1, 1, 1), (24, 5, 5)])
def test_frame_grid_lays_every_frame_out_row_by_row(frames, rows, cols) -> None:
    latents = torch.randn(frames, 4, 3, 5)
    grid = lookback_patch.frame_grid(latents)
    assert grid.shape == (1, 4, rows * 3, cols * 5)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        cell = grid[0, :, r * 3 : (r + 1) * 3, c * 5 : (c + 1) * 5]
        assert torch.equal(cell, latents[i] if i < frames else torch.zeros_like(latents[0])), i
