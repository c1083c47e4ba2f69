"""``python -m lookback_cli``: a tiny real-format checkpoint and weights file, end to end."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import PEAK_RSS_EXPRESSION

from lookback_cli.main import main
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
        (("--image", "{tmp}/v.mp4"), "--image: {tmp}/v.mp4 is a folder, expected a file"),
        (("--image", "{tmp}/fifo"), "--image: {tmp}/fifo is a FIFO (named pipe), expected a file"),
        (("--weights", "{tmp}/fifo"), "--weights: {tmp}/fifo is a FIFO (named pipe), expected a file"),
        (("--checkpoint", "{tmp}/v.mp4"), "--checkpoint: {tmp}/v.mp4 is a folder, expected a file"),
        (("--out", "video.avi"), "--out: unknown video format from the suffix of path 'video.avi'"),
        (("--out", "{tmp}/v.mp4"), "--out: path '{tmp}/v.mp4' is a folder"),
        (("--out", "{tmp}/afile/v.mp4"), "--out: cannot write '{tmp}/afile/v.mp4': '{tmp}/afile' is a file"),
        (("--fps", "0"), "--fps: fps must be a positive number, got 0.0"),
        (("--fps", "nan"), "--fps: fps must be a positive number, got nan"),
        (("--frames", "1"), "--frames must be at least 2"),
        (
            ("--chunk-frames", "4", "--context-frames", "4"),
            "--context-frames must be between 1 and --chunk-frames - 1 (3), got 4",
        ),
        (("--context-frames", "2"), "--context-frames needs --chunk-frames"),
        (("--steps", "0"), "--steps must be a whole number in 1..1000"),
        (("--eta", "1.5"), "--eta must be a number in 0..1"),
        (("--eta", "nan"), "--eta must be a number in 0..1"),
        (("--cfg", "nan"), "--cfg must be a number in 0..100"),
        (("--cfg", "inf"), "--cfg must be a number in 0..100"),
        (("--seed", "-1"), "--seed must be a whole number in 0..2^64-1"),
        (("--out", "/proc/v.mp4"), "--out: cannot write '/proc/v.mp4': the folder '/proc' is not writable"),
        (("--out", "{tmp}/" + "x" * 300 + ".mp4"), "is longer than 255 bytes"),
        (("--config-dir", "{tmp}/nowhere"), "--config-dir: no such folder"),
        (("--width", "0"), "--width must be a positive number of pixels"),
        (("--width", "40"), "requested size 40x"),
        (("--device", "potato"), "--device: 'potato' is not a device"),
        (("--device", "cuda:99"), "--device cuda:99: "),
        (("--frames", "100000"), "estimated for 100000 frames of 88x64"),
        (("--width", "20000"), "estimated for 5 frames of 20000x"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(
    assets, tmp_path, capsys, monkeypatch, change, message
) -> None:
    import lookback_core.sd15 as sd15

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sd15, "load_sd15", never)
    (tmp_path / "v.mp4").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    os.mkfifo(tmp_path / "fifo")  # never opened: reading it would wait for a writer
    args = _args(assets, tmp_path / "v.gif")
    change = [value.replace("{tmp}", str(tmp_path)) for value in change]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    if "estimated for" in message:  # a refusal names the estimate and the ways out
        assert "--skip-memory-check" in err and "GiB" in err


def test_an_out_name_ffmpeg_would_read_as_a_protocol_is_written_as_that_file(
    assets, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("cam:1/v.gif", "file:sub/v.mp4"):
        assert main(_args(assets, Path(name), "--frames", "2", "--steps", "1")) == 0
        assert read_video(tmp_path / name).shape[0] == 2
    assert not (tmp_path / "sub").exists()


def test_the_largest_seed_samples(assets, tmp_path) -> None:
    # seeds wrap round 2^64 where the sampler derives more generators from the one given
    assert main([*_args(assets, tmp_path / "v.gif"), "--seed", str(2**64 - 1), "--steps", "1"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--clips", "0"], "--clips must be a whole number in 1..10000, got 0"),
        (["eval", "--clips", "-1"], "--clips must be a whole number in 1..10000, got -1"),
        (["eval", "--clips", "1000000000"], "--clips must be a whole number in 1..10000, got 1000000000"),
        (["eval", "--first-seed", "5"], "--split/--clips/--first-seed: 64 clips from seed 5 leave the validation split (seeds 1000000..2999999)"),
        (["eval", "--split", "test", "--first-seed", "3999990", "--clips", "11"], "11 clips from seed 3999990 leave the test split"),
        (["eval", "--workers", "0"], "--workers must be a whole number in 1..64, got 0"),
        (["eval", "--frames", "40"], "--frames must be a whole number in 2..25"),
        (["eval", "--steps", "0"], "--steps: steps=0 must be a whole number in 1..1000"),
        (["eval", "--chunk-frames", "4", "--context-frames", "4"], "--context-frames must be between 1 and"),
        (["eval", "--json", "{tmp}"], "--json: path '{tmp}' is a folder, not a file"),
        (["eval", "--json", "{tmp}/afile/r.json"], "--json: cannot write '{tmp}/afile/r.json': '{tmp}/afile' is a file"),
        (["eval", "--json", "/proc/r.json"], "--json: cannot write '/proc/r.json': the folder '/proc' is not writable"),
        (["eval", "--plots", "{tmp}/afile"], "--plots: '{tmp}/afile' is a file, not a folder"),
        (["build", "--out", "{tmp}/b", "--train-clips", "-1"], "--train-clips must be a whole number in 1..100000, got -1"),
        (["build", "--out", "{tmp}/b", "--train-clips", "1000000000000"], "--train-clips must be a whole number in 1..100000"),
        (["build", "--out", "{tmp}/b", "--lookback-steps", "0"], "--lookback-steps must be a whole number in 1..1000000, got 0"),
        (["build", "--out", "{tmp}/b", "--full-clip-timestep-bias", "0.5"], "--full-clip-timestep-bias must be a number in 1..100, got 0.5"),
        (["build", "--out", "{tmp}/b", "--preset", "bogus"], "--preset must be one of ['light', 'light-decoder', 'paper']"),
        (["build", "--out", "{tmp}/b", "--sampler-cfg-scale", "nan"], "--sampler-cfg-scale must be a number in 0..100"),
        (["build", "--out", "/proc/toy"], "--out: cannot write '/proc/toy': the folder '/proc' is not writable"),
        (["build", "--out", "{tmp}/afile"], "--out: '{tmp}/afile' is a file, not a folder"),
        (["ablate", "--out", "{tmp}/b", "--eval-clips", "0"], "--eval-clips must be a whole number in 1..10000"),
        (["demo", "--out", "{tmp}/b", "--clip", "-5"], "--clip must be 0 or more (clip N is seed 1000000 + N, of the validation split)"),
        (["demo", "--out", "{tmp}/afile"], "--out: '{tmp}/afile' is a file, not a folder"),
    ],
)  # fmt: skip
def test_toyworld_numbers_and_outputs_are_checked_before_any_work(
    tmp_path, capsys, monkeypatch, argv, message
) -> None:
    import toyworld.ablate as toyablate
    import toyworld.build as toybuild
    import toyworld.evaluate as toyeval

    def never(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    import lookback_cli.demo as demo

    for module, name in (
        (toyeval, "load_toy_model"),
        (toybuild, "prepare"),
        (toyablate, "prepare"),
        (demo, "run_demo"),
    ):
        monkeypatch.setattr(module, name, never)
    (tmp_path / "afile").write_text("a file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv if argv[0] == "demo" else ["toyworld", *argv]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_an_oversized_image_is_refused_with_little_memory(assets, tmp_path) -> None:
    """A 9000x9000 image is refused from its header: the process never decodes it (about 1 GB as floats)."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 9000), (90, 120, 200)).save(big)
    args = _args(assets, tmp_path / "v.gif")
    args[args.index("--image") + 1] = str(big)
    script = (
        "import sys\n"
        "from lookback_cli.main import main\n"
        f"code = main({args!r})\n"
        f"print('exit', code, 'peak', {PEAK_RSS_EXPRESSION})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert "estimated for 5 frames of 9000x9000" in result.stderr, result.stderr
    code, peak = result.stdout.split()[1], int(result.stdout.split()[3])
    assert code == "2" and peak < 2**30, f"peak {peak / 2**20:.0f} MiB"


def test_long_prompts_are_encoded_whole_and_said_so(assets, tmp_path, capsys) -> None:
    args = _args(assets, tmp_path / "v.gif")
    args[args.index("--prompt") + 1] = " ".join(f"word{i}" for i in range(80))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--prompt: " in out and "tokens, more than CLIP's 75 per sequence: encoded whole in" in out


def test_a_long_prompt_raises_no_warning_that_it_is_cut() -> None:
    # the shipped toy has CLIP's own tokenizer and 77 positions: transformers would warn of "indexing
    # errors" for any prompt over 77 tokens, though the windows never pass more to the model
    from lookback_core.prompts import encode_long_prompt
    from toyworld.model import TOY_CHECKPOINT

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records, transformers_logger = Records(), logging.getLogger("transformers")
    transformers_logger.addHandler(records)
    try:
        parts = load_sd15(TOY_CHECKPOINT)
        prompt = " ".join(f"word{i}" for i in range(80))
        hidden, tokens = encode_long_prompt(parts.tokenizer, parts.text_encoder, prompt, "cpu")
    finally:
        transformers_logger.removeHandler(records)
    assert tokens > 77 and hidden.shape[1] == 77 * 4
    assert not [m for m in records.messages if "Token indices sequence length" in m]


def test_a_prompt_that_is_not_utf8_is_named_before_the_model_loads(assets, tmp_path, capsys) -> None:
    args = _args(assets, tmp_path / "v.gif")
    args[args.index("--prompt") + 1] = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # as argv gives it
    assert main(args) == 2
    assert "--prompt is not valid UTF-8 text (byte b'\\xe9' at character 3)" in capsys.readouterr().err
    assert not (tmp_path / "v.gif").exists()


def test_sigterm_removes_the_half_written_video(assets, tmp_path) -> None:
    """Killed while writing, generate leaves neither the video nor its hidden temporary file."""
    out = tmp_path / "v.mp4"
    script = (
        "import time, sys\n"
        "import lookback_core.video_io as video_io\n"
        "real = video_io._write\n"
        "def slow(data, partial, *rest):\n"
        "    real(data, partial, *rest)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "video_io._write = slow\n"
        "from lookback_cli.main import main\n"
        f"sys.exit(main({_args(assets, out)!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    for line in process.stdout:
        if line.startswith("written"):
            break
    assert list(tmp_path.glob(".v.mp4.*.part")), "the temporary file should exist while writing"
    process.terminate()
    assert process.wait(timeout=60) == 128 + 15
    assert not out.exists() and not list(tmp_path.glob(".v.mp4.*")), list(tmp_path.iterdir())


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path) -> None:
    from lookback_core.atomic import atomic_path

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".v.mp4.{dead.stdout.strip()}-0badc0de.part"
    stale.write_bytes(b"half a video")
    live = tmp_path / f".v.mp4.{os.getpid()}-0badc0de.part"  # a writer that still runs: kept
    live.write_bytes(b"being written")
    with atomic_path(tmp_path / "v.mp4") as partial:
        partial.write_bytes(b"video")
    assert not stale.exists() and live.exists() and (tmp_path / "v.mp4").read_bytes() == b"video"


def test_checkpoint_passed_as_weights_is_named(assets, tmp_path, capsys) -> None:
    args = _args(assets, tmp_path / "v.mp4")
    args[args.index("--weights") + 1] = str(assets["checkpoint"])
    assert main(args) == 2
    assert "not a look-back temporal weights file" in capsys.readouterr().err


def test_module_entry_point_and_info(assets) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lookback_cli", "info", str(assets["weights"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["base_family"] == "sd15" and info["config"]["depth"] == 3
    assert info["training"] == {"frames": 4} and info["latent_scale"] is None  # written without it


def test_without_weights_the_base_unet_alone_makes_the_frames(assets, tmp_path, capsys) -> None:
    from lookback_cli.generate import run_generate
    from lookback_cli.main import build_parser

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
        tmp_path / "recommending.safetensors",
        temporal,
        recommended_sampler={"steps": 3, "cfg_scale": 1.5, "colour_match": "first_frame"},
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
        "sampler: 3 DDIM steps, cfg 1.5, eta 0, colour match first_frame (--steps, --cfg, --colour-match as the "
        "weights file recommends; --eta, --first-frame by default)" in capsys.readouterr().out
    )
    assert main([*base, "--steps", "2", "--eta", "0.5", "--colour-match", "off"]) == 0
    assert (
        "sampler: 2 DDIM steps, cfg 1.5, eta 0.5, colour match off (--steps, --eta, --colour-match as given; "
        "--cfg as the weights file recommends; --first-frame by default)" in capsys.readouterr().out
    )
    assert [(s.steps, s.cfg_scale, s.eta, s.colour_match) for s in used] == [
        (3, 1.5, 0.0, "first_frame"),
        (2, 1.5, 0.5, "off"),
    ]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lookback_cli", "info", str(recommending_weights)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"recommended_sampler": {\n    "steps": 3,\n    "cfg_scale": 1.5' in result.stdout
    assert (
        "generate uses the recommended sampler settings (--steps 3, --cfg 1.5, --colour-match first_frame)"
        in (result.stdout)
    )


@pytest.mark.parametrize(
    ("given", "recommended", "origin"),
    [
        ({}, {}, "the defaults"),
        (
            {"steps": 3, "cfg_scale": 2.0, "eta": 0.0, "first_frame": "clean", "colour_match": "off"},
            {},
            "as given",
        ),
        (
            {},
            {"steps": 3},
            "--steps as the weights file recommends; --cfg, --eta, --first-frame, --colour-match by default",
        ),
        (
            {"eta": 0.5},
            {"steps": 3, "cfg_scale": 1.5},
            "--eta as given; --steps, --cfg as the weights file recommends; --first-frame, --colour-match by default",
        ),
    ],
)
def test_generate_says_where_each_sampler_setting_came_from(given, recommended, origin) -> None:
    from lookback_cli.generate import parse_generate_args, sampler_settings

    args = parse_generate_args(["--checkpoint", "c", "--image", "i", "--out", "v.gif"])
    for name, value in given.items():
        setattr(args, name, value)
    assert sampler_settings(args, recommended)[1] == origin
