"""The cache step (``--cache_only``): every clip window encoded once, then training from the cache
alone, without the VAE encoder or the text encoder; resumable, and never reused for other settings."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_args
from PIL import Image

import training.cache_step as cache_step
import training.train as train_module
from training.cache import MANIFESTS

REPO = Path(__file__).parents[1]


def _entries(cache: Path, prefix: str = "") -> list[Path]:
    return [p for p in cache.rglob("*.safetensors") if p.name.startswith(prefix)]


def _image(folder: Path) -> Path:
    path = folder / "start.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


def test_a_run_trains_from_the_cache_step_without_either_encoder_and_each_epoch_sees_other_clips(
    setup, tmp_path, monkeypatch, caplog
) -> None:
    cache, image = tmp_path / "cache", _image(tmp_path)
    common = ["--cache_dir", str(cache), "--cache_clips_per_video", "2", "--validation_image", str(image),
              "--validation_prompt", "a red square", "--validation_frames", "3", "--validation_inference_steps", "1"]  # fmt: skip
    assert train_main_ok(train_args(setup, tmp_path / "step", *common, "--cache_only"))
    clips = [p for p in _entries(cache) if not p.name.startswith(("prompt-", "image-"))]
    assert len(clips) == 8 * 2  # 8 videos, 2 windows each
    assert (
        len(_entries(cache, "prompt-")) == 2 and len(_entries(cache, "image-")) == 1
    )  # "", the prompt; the image
    assert len(list(cache.rglob(f"{MANIFESTS}/*.json"))) == 1

    loaded, keys = [], []
    real_load, real_encode = train_module.load_sd15, train_module._encode_batch

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    def encode(batch, *args):
        keys.append(list(batch["keys"]))
        return real_encode(batch, *args)

    monkeypatch.setattr(train_module, "load_sd15", load)
    monkeypatch.setattr(train_module, "_encode_batch", encode)
    out = tmp_path / "run"
    with caplog.at_level("INFO"):  # 8 clips, batch 2: two epochs in 8 steps
        assert train_main_ok(
            train_args(setup, out, *common, "--max_train_steps", "8", "--validation_steps", "8")
        )
    (components,) = loaded
    assert (
        components.vae.encoder is None
        and components.vae.quant_conv is None
        and components.text_encoder is None
    )
    assert "the VAE encoder and text encoder are not loaded" in caplog.text
    first, second = {k for batch in keys[:4] for k in batch}, {k for batch in keys[4:] for k in batch}
    assert len(first) == len(second) == 8 and not first & second  # every video, another window each epoch
    assert first | second == {p.stem for p in clips}
    assert (out / "validation" / "step-0000008.mp4").is_file()  # the cached image and prompts
    assert len(clips) == len([p for p in _entries(cache) if not p.name.startswith(("prompt-", "image-"))])

    # other clip settings: that manifest does not stand for them; the clips are encoded as they come
    loaded.clear()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train_main_ok(train_args(setup, tmp_path / "other", *common, "--max_train_steps", "1",
                                        "--frame_stride", "1"))  # fmt: skip
    assert "holds no finished cache step of these settings" in caplog.text
    assert loaded[0].vae.encoder is not None and loaded[0].text_encoder is not None


def test_clip_windows_spread_over_the_video_or_drawn_once_from_the_seed(setup) -> None:
    from training.data import ClipWindows, clip_items
    from training.dataset_config import DatasetSpec

    (item,) = clip_items(
        [DatasetSpec(path=str(setup["data"]), resolution=(32,), num_frames=(4,), buckets=False)]
    )[0][:1]
    total, span = 40, 7  # room for starts 0..33
    assert [ClipWindows(4).start(total, span, 0, item, k) for k in range(4)] == [0, 11, 22, 33]
    assert ClipWindows(1).start(total, span, 0, item, 0) == 16  # one window: the centre clip, as before
    drawn = [ClipWindows(4, "random").start(total, span, 0, item, k) for k in range(4)]
    assert all(0 <= s <= total - span for s in drawn) and len(set(drawn)) > 1
    assert drawn == [
        ClipWindows(4, "random").start(total, span, 0, item, k) for k in range(4)
    ]  # reproducible
    assert drawn != [ClipWindows(4, "random").start(total, span, 1, item, k) for k in range(4)]  # by the seed


def test_a_killed_cache_step_resumes_and_encodes_only_what_is_missing(setup, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    arguments = train_args(setup, tmp_path / "step", "--cache_dir", str(cache), "--cache_clips_per_video", "3",
                           "--cache_only")  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, str(REPO / "training" / "train.py"), *arguments], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while len(_entries(cache)) < 6 and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    before = len(_entries(cache))
    assert 6 <= before < 8 * 3, before  # killed part way
    assert not list(cache.rglob(f"{MANIFESTS}/*.json"))  # no manifest: not a finished step
    encoded, real = [], cache_step.encode_latents
    monkeypatch.setattr(cache_step, "encode_latents", lambda *a: encoded.append(1) or real(*a))
    assert train_main_ok(arguments)
    assert len(_entries(cache)) == 8 * 3 + 1 and len(encoded) == 8 * 3 - before  # + the empty caption
    assert len(list(cache.rglob(f"{MANIFESTS}/*.json"))) == 1


@pytest.mark.parametrize(("flag", "value"), [("--cache_only", None), ("--cache_clips_per_video", "2")])
def test_cache_flags_without_a_cache_are_named(setup, tmp_path, capsys, flag, value) -> None:
    from training.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(train_args(setup, tmp_path / "run", flag, *([value] if value else [])))
    assert f"{flag} is about the latent cache: add --cache_dir" in capsys.readouterr().err


def train_main_ok(arguments: list[str]) -> bool:
    return train_module.main(arguments) == 0
