"""The ComfyUI nodes called directly on real tensors, without the host (CI).

With ``COMFYUI_PATH`` set, tests/test_comfyui_server.py runs them inside a real ComfyUI.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lookback_core.video_io import read_metadata, read_video
from nodes import bridge, host
from nodes.loader import load_lookback_model
from nodes.sampler import LookBackSampler
from nodes.video import LookBackVideoCombine

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_files):
    files = tiny_files
    return load_lookback_model(
        str(files["checkpoint"]), str(files["weights"]), "fp32", config_dir=str(files["config_dir"])
    )


def _conditioning(seed: int, tokens: int = 77, dim: int = 32) -> list:
    return [
        [torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed)), {"pooled_output": None}]
    ]


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
    assert {"LookBackModelLoader", "LookBackSampler", "LookBackVideoCombine"} <= set(pack.NODE_CLASS_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "Look-Back I2V" and callable(getattr(cls(), cls.FUNCTION)), name
        inputs = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, spec_ in inputs.get(group, {}).items():
                assert spec_[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_loader_drops_the_unused_vae_and_text_encoder(bundle) -> None:
    assert bundle.context_dim == 32 and bundle.precision == "fp32"
    assert len(bundle.model.config.sites) == 21
    assert bundle.scheduler_config["beta_schedule"] == "scaled_linear"


def test_sampler_node_returns_latent_frames_starting_with_the_start_latent(bundle) -> None:
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    (out,) = LookBackSampler().sample(
        bundle, _conditioning(1), _conditioning(2), frames=4, steps=2, cfg=3.0, eta=0.0, seed=1,
        start_latent={"samples": start},
    )  # fmt: skip
    samples = out["samples"]
    assert samples.shape == (8, 4, 8, 8) and samples.dtype == torch.float32
    # frame order: video 0's four frames, then video 1's; each starts with its own start latent
    torch.testing.assert_close(samples[0], start[0])
    torch.testing.assert_close(samples[4], start[1])
    assert not torch.allclose(samples[1], start[0], atol=0.5)
    (again,) = LookBackSampler().sample(
        bundle, _conditioning(1), _conditioning(2), 4, 2, 3.0, 0.0, 1, start_latent={"samples": start}
    )
    assert torch.equal(again["samples"], samples)
    assert next(bundle.model.parameters()).device == host.offload_device()


def test_sampler_node_makes_long_videos_in_chunks(bundle) -> None:
    start = torch.randn(1, 4, 8, 8)
    (out,) = LookBackSampler().sample(
        bundle, _conditioning(1), _conditioning(2), 9, 1, 2.0, 0.0, 0, start_latent={"samples": start},
        chunk_frames=4, context_frames=2,
    )  # fmt: skip
    assert out["samples"].shape == (9, 4, 8, 8)
    torch.testing.assert_close(out["samples"][0], start[0])
    with pytest.raises(ValueError, match="context_frames must be between 1 and"):
        LookBackSampler().sample(
            bundle, _conditioning(1), _conditioning(2), 9, 1, 2.0, 0.0, 0, start_latent={"samples": start},
            chunk_frames=4, context_frames=4,
        )  # fmt: skip


def test_sampler_node_accepts_long_prompts_against_short_negatives(bundle) -> None:
    start = torch.randn(1, 4, 8, 8)
    (out,) = LookBackSampler().sample(
        bundle,
        _conditioning(1, tokens=154),
        _conditioning(2),
        3,
        1,
        2.0,
        0.0,
        0,
        start_latent={"samples": start},
    )
    assert out["samples"].shape == (3, 4, 8, 8)


def test_sampler_node_names_missing_and_mismatched_inputs(bundle) -> None:
    with pytest.raises(ValueError, match="needs a start"):
        LookBackSampler().sample(bundle, _conditioning(1), _conditioning(2), 3, 1, 2.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"positive: conditioning of shape \(1, 77, 768\)"):
        LookBackSampler().sample(
            bundle, _conditioning(1, dim=768), _conditioning(2), 3, 1, 2.0, 0.0, 0,
            start_latent={"samples": torch.zeros(1, 4, 8, 8)},
        )  # fmt: skip


def test_bridge_conversions() -> None:
    latents = torch.randn(2, 4, 3, 8, 8)
    out = bridge.video_latent_out(latents)["samples"]
    assert out.shape == (6, 4, 8, 8)
    torch.testing.assert_close(bridge.latent_in(out[3]), latents[1, :, 0])
    image = torch.rand(1, 70, 91, 3)
    cropped, message = bridge.crop_to_multiple_of_8(image)
    assert cropped.shape == (1, 64, 88, 3) and "centre-cropped to 88x64" in message
    torch.testing.assert_close(cropped, image[:, 3:67, 1:89])
    assert bridge.crop_to_multiple_of_8(cropped)[1] is None
    with pytest.raises(ValueError, match="conditioning is empty"):
        bridge.conditioning_embeddings([], "negative", 768)


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
    path = Path(first["result"][0])
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
