"""``python -m lookback_core``: a tiny real-format checkpoint and weights file, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lookback_core.cli import main
from lookback_core.image_prep import fit_to_multiple, load_image
from lookback_core.pipeline import decode_latents, encode_image_latent
from lookback_core.sd15 import load_sd15
from lookback_core.video_io import read_video

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def assets(tiny_files, tmp_path_factory):
    image = tmp_path_factory.mktemp("cli") / "start.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 255, size=(70, 90, 3), dtype=np.uint8))
    return {**tiny_files, "image": image}


def _args(assets, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--checkpoint", str(assets["checkpoint"]),
        "--weights", str(assets["weights"]),
        "--image", str(assets["image"]),
        "--prompt", "a red ball rolls",
        "--frames", "5",
        "--steps", "2",
        "--out", str(out),
        "--config-dir", str(assets["config_dir"]),
        *extra,
    ]  # fmt: skip


def test_generate_writes_video_whose_first_frame_is_the_image(assets, tmp_path, capsys, monkeypatch) -> None:
    import lookback_core.video_io as video_io

    written = {}
    real_write = video_io.write_video

    def spy(frames, path, **kwargs):
        written["frames"] = frames.clone()
        return real_write(frames, path, **kwargs)

    monkeypatch.setattr(video_io, "write_video", spy)
    out = tmp_path / "video.mp4"
    assert main(_args(assets, out, "--fps", "6")) == 0
    err = capsys.readouterr().err
    assert "not a multiple of 8" in err  # 70x90 was cropped, with a message
    video = read_video(out)
    assert video.shape == (5, 64, 88, 3)
    # Frame 0 is the pinned image latent, decoded: the VAE round trip of the image.
    components = load_sd15(assets["checkpoint"], config_dir=assets["config_dir"])
    image, _ = fit_to_multiple(load_image(assets["image"]), width=None, height=None)
    expected = decode_latents(components.vae, encode_image_latent(components.vae, image).unsqueeze(2))[0, 0]
    torch.testing.assert_close(written["frames"][0], expected.permute(1, 2, 0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(written["frames"][1], written["frames"][0], atol=1e-2)


def test_long_video_in_chunks(assets, tmp_path) -> None:
    out = tmp_path / "long.gif"
    assert main(_args(assets, out, "--frames", "9", "--chunk-frames", "4", "--context-frames", "2")) == 0
    assert read_video(out).shape[0] == 9


def test_same_seed_same_gif(assets, tmp_path) -> None:
    a, b = tmp_path / "a.gif", tmp_path / "b.gif"
    assert main(_args(assets, a, "--seed", "3")) == 0
    assert main(_args(assets, b, "--seed", "3")) == 0
    assert np.array_equal(read_video(a), read_video(b))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--weights", "missing.safetensors"), "--weights: no such file"),
        (("--image", "nowhere.png"), "--image: no such file"),
        (("--out", "video.avi"), "--out: the file name must end in"),
        (("--frames", "1"), "--frames must be at least 2"),
        (("--chunk-frames", "4", "--context-frames", "4"), "--context-frames must be between 1 and"),
    ],
)
def test_bad_input_is_a_clear_error(assets, tmp_path, capsys, change, message) -> None:
    args = _args(assets, tmp_path / "v.mp4")
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_passed_as_weights_is_named(assets, tmp_path, capsys) -> None:
    args = _args(assets, tmp_path / "v.mp4")
    args[args.index("--weights") + 1] = str(assets["checkpoint"])
    assert main(args) == 2
    assert "not a look-back temporal weights file" in capsys.readouterr().err


def test_module_entry_point_and_info(assets) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lookback_core", "info", str(assets["weights"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["base_family"] == "sd15" and info["config"]["depth"] == 3
    assert info["training"] == {"frames": 4}


def test_without_weights_the_base_unet_alone_makes_the_frames(assets, tmp_path, capsys) -> None:
    from lookback_core.cli import build_parser, run_generate

    args = _args(assets, tmp_path / "base.gif")
    del args[args.index("--weights") : args.index("--weights") + 2]
    base, _ = run_generate(build_parser().parse_args(args))
    assert "(base UNet, no look-back)" in capsys.readouterr().out
    lookback, _ = run_generate(build_parser().parse_args(_args(assets, tmp_path / "lookback.gif")))
    assert base.shape == lookback.shape == (5, 3, 64, 88)
    assert torch.equal(base[0], lookback[0])  # the same pinned image
    assert (base[1:] - lookback[1:]).abs().mean() > 1e-3  # the look-back modules changed the rest


@pytest.fixture
def recommending_weights(assets, tmp_path):
    from lookback_core.weights import load_temporal_modules, save_temporal_weights

    temporal = load_temporal_modules(
        assets["weights"], load_sd15(assets["checkpoint"], config_dir=assets["config_dir"]).unet
    )
    return save_temporal_weights(
        tmp_path / "recommending.safetensors", temporal, recommended_sampler={"steps": 3, "cfg_scale": 1.5}
    )


def test_generate_uses_the_recommended_sampler_settings_where_no_flag_is_given(
    assets, recommending_weights, tmp_path, capsys, monkeypatch
) -> None:
    import lookback_core.pipeline as pipeline

    used = []
    real = pipeline.sample_long_video
    monkeypatch.setattr(pipeline, "sample_long_video", lambda *a, **k: used.append(a[5]) or real(*a, **k))
    base = _args(assets, tmp_path / "v.gif")
    base[base.index("--weights") + 1] = str(recommending_weights)
    del base[base.index("--steps") : base.index("--steps") + 2]
    assert main(base) == 0
    assert (
        "sampler: 3 DDIM steps, cfg 1.5, eta 0 (--steps, --cfg as the weights file recommends)"
        in capsys.readouterr().out
    )
    assert main([*base, "--steps", "2", "--eta", "0.5"]) == 0
    assert (
        "sampler: 2 DDIM steps, cfg 1.5, eta 0.5 (--cfg as the weights file recommends)"
        in capsys.readouterr().out
    )
    assert [(s.steps, s.cfg_scale, s.eta) for s in used] == [(3, 1.5, 0.0), (2, 1.5, 0.5)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lookback_core", "info", str(recommending_weights)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"recommended_sampler": {\n    "steps": 3,\n    "cfg_scale": 1.5' in result.stdout
    assert "generate uses the recommended sampler settings (--steps 3, --cfg 1.5)" in result.stdout
