"""The trainer on tiny models and a tiny generated video set (CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import assert_same_weights, make_tiny_unet, train_args, wait_for_checkpoint
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from toy_clips import square_dataset, toy_frames, write_toy_videos

from lookback_core.config import preset
from lookback_core.sd15 import SHIPPED_CONFIG_DIR
from lookback_core.temporal_unet import create_lookback_unet
from lookback_core.video_io import write_video
from lookback_core.weights import (
    TemporalWeightsError,
    load_lookback_unet,
    read_temporal_header,
    save_temporal_weights,
)
from training import checkpoints
from training.cache import checkpoint_fingerprint
from training.data import collate, discover_samples
from training.objective import hybrid_noisy_latents, lookback_loss, motion_weights, timestep_weights
from training.train import main as train_main

REPO = Path(__file__).parents[1]
SCHEDULER_CONFIG = json.loads((SHIPPED_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())


def test_a_few_steps_end_to_end_write_deployable_weights(setup, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    assert train_main(train_args(setup, out, *args)) == 0
    header = read_temporal_header(out / "lookback_weights.safetensors")
    assert header.base_family == "sd15" and header.config.depth == 3
    assert header.training["steps"] == 3 and header.training["frames"] == 4 and header.training["stride"] == 2
    assert header.recommended_sampler == {"steps": 25, "cfg_scale": 7.5}  # the validation settings
    from lookback_core.sd15 import load_sd15

    unet = load_sd15(setup["checkpoint"], config_dir=setup["config_dir"]).unet
    model = load_lookback_unet(out / "lookback_weights.safetensors", unet, latent_scale=0.18215)
    assert any(p.abs().sum() > 0 for p in model.temporal.parameters())  # trained away from zero
    # the base's facts are recorded, and a base whose VAE scales otherwise is refused by name
    assert header.training["latent_scale"] == 0.18215 and header.training["context_dim"] == 32
    with pytest.raises(
        TemporalWeightsError, match=r"trained on latents scaled by 0\.18215.*scales by 0\.779"
    ):
        load_lookback_unet(out / "lookback_weights.safetensors", unet, latent_scale=0.779)
    # checkpoint-2 was pruned after checkpoint-3 was in place; the frozen UNet is not in it
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-3"]
    assert all(k.startswith("temporal.") for k in load_file(out / "checkpoint-3" / "model.safetensors"))
    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(np.isfinite(line["loss"]) and line["lr"] == 1e-4 and line["clips_per_s"] > 0 for line in lines)


def test_train_backbone_writes_the_trained_unet_beside_the_base_parts(setup, tmp_path) -> None:
    from lookback_core.sd15 import load_sd15

    out = tmp_path / "run"
    extra = ["--max_train_steps", "2", "--train_backbone", "--learning_rate", "1e-3",
             "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1"]  # fmt: skip
    assert train_main(train_args(setup, out, *extra)) == 0
    base = load_sd15(setup["checkpoint"], config_dir=setup["config_dir"])
    trained = load_sd15(out / checkpoints.BACKBONE_NAME, config_dir=setup["config_dir"])
    changed = [
        k for k, v in trained.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])
    ]
    assert len(changed) > 0.5 * len(base.unet.state_dict())
    for part in ("vae", "text_encoder"):
        before, after = getattr(base, part).state_dict(), getattr(trained, part).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), part
    # the deployable pair: the trained UNet with the temporal weights, which record the UNet's rate
    header = read_temporal_header(out / "lookback_weights.safetensors")
    assert header.training["train_backbone"] and header.training["backbone_learning_rate"] == 1e-3
    model = load_lookback_unet(out / "lookback_weights.safetensors", trained.unet)
    assert any(p.abs().sum() > 0 for p in model.temporal.parameters())


def test_train_text_encoder_trains_it_into_the_backbone_checkpoint_and_resumes_it(
    setup, tmp_path, caplog
) -> None:
    from lookback_core.sd15 import load_sd15

    def run(out: Path, steps: int, *extra: str) -> int:
        flags = ["--max_train_steps", str(steps), "--checkpointing_steps", "1", "--train_backbone",
                 "--train_text_encoder", "--learning_rate", "1e-3", "--text_encoder_learning_rate", "5e-3",
                 "--text_dropout", "0.5", "--cache_dir", str(tmp_path / "cache"), *extra]  # fmt: skip
        return train_main(train_args(setup, out, *flags))

    assert run(tmp_path / "straight", 3) == 0
    base = load_sd15(setup["checkpoint"], config_dir=setup["config_dir"])
    trained = load_sd15(tmp_path / "straight" / checkpoints.BACKBONE_NAME, config_dir=setup["config_dir"])
    before, after = base.text_encoder.state_dict(), trained.text_encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(before)  # trained (through the cache, which holds latents for it)
    assert all(torch.equal(v, trained.vae.state_dict()[k]) for k, v in base.vae.state_dict().items())
    header = read_temporal_header(tmp_path / "straight" / "lookback_weights.safetensors")
    assert header.training["train_text_encoder"] and header.training["text_encoder_learning_rate"] == 5e-3
    # stopped after step 2 and resumed: its optimiser state and weights were in the checkpoint
    assert run(tmp_path / "resumed", 2) == 0
    assert run(tmp_path / "resumed", 3, "--resume_from_checkpoint", "latest") == 0
    resumed = load_sd15(tmp_path / "resumed" / checkpoints.BACKBONE_NAME, config_dir=setup["config_dir"])
    for name, value in resumed.text_encoder.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=1e-6, msg=name)
    # resuming it with a frozen text encoder would record a training it was not
    flags = ["--max_train_steps", "4", "--train_backbone", "--resume_from_checkpoint", "latest"]
    assert train_main(train_args(setup, tmp_path / "resumed", *flags)) == 2
    assert "train_text_encoder True (this run: False)" in caplog.text


def test_ema_covers_the_backbone_too_and_the_exported_files_hold_the_average(setup, tmp_path) -> None:
    from lookback_core.sd15 import load_sd15

    out = tmp_path / "run"
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--train_backbone", "--use_ema",
             "--ema_decay", "0.5", "--learning_rate", "1e-3"]  # fmt: skip
    assert train_main(train_args(setup, out, *extra)) == 0
    # the shadow weights follow the trainer's order of trained parameters: the whole model's
    base = load_sd15(setup["checkpoint"], config_dir=setup["config_dir"])
    names = [name for name, _ in create_lookback_unet(base.unet, preset("light")).named_parameters()]
    shadow = load_file(out / "checkpoint-3" / "ema.safetensors")
    average = {name: shadow[f"shadow.{i}"] for i, name in enumerate(names)}
    assert len(shadow) == len(names)
    exported = load_sd15(out / checkpoints.BACKBONE_NAME, config_dir=setup["config_dir"]).unet
    model = load_lookback_unet(out / "lookback_weights.safetensors", exported)
    for name, value in model.named_parameters():
        assert torch.allclose(value, average[name], atol=1e-6), name
    # the average, not the last step's weights (the checkpoint's model state, in the file layout)
    raw, state = load_file(out / "checkpoint-3" / "model.safetensors"), model.state_dict()
    differs = sum(not torch.allclose(state[name], raw[name], atol=1e-6) for name in names)
    assert differs > 0.5 * len(names)


def test_ddpm_objective_records_the_add_noise_strategy_in_the_weights(setup, tmp_path) -> None:
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "1", "--objective", "ddpm")) == 0
    header = read_temporal_header(out / "lookback_weights.safetensors")
    assert header.training["objective"] == "ddpm"
    assert header.recommended_sampler == {"steps": 25, "cfg_scale": 7.5, "first_frame": "noised"}


def test_timestep_bias_draws_the_chosen_timesteps_more_often() -> None:
    assert timestep_weights(1000) is None and timestep_weights(1000, "later", 1.0) is None  # uniform
    later = timestep_weights(1000, "later", 4.0, portion=0.3)
    assert later[:700].eq(1).all() and later[700:].eq(4).all()
    earlier = timestep_weights(1000, "earlier", 0.5, portion=0.1)
    assert earlier[:100].eq(0.5).all() and earlier[100:].eq(1).all()
    ranged = timestep_weights(1000, "range", 3.0, begin=200, end=300)
    assert ranged[200:300].eq(3).all() and ranged.sum() == 1000 + 200
    with pytest.raises(ValueError, match="strategy must be one of"):
        timestep_weights(1000, "latest", 2.0)
    # the loss draws with the weights: every timestep the model sees is in the biased range
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, ctx):
            seen.append(t.clone())
            return torch.zeros_like(x)

    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    only_late = torch.zeros(1000)
    only_late[900:] = 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        lookback_loss(Recorder(), torch.randn(8, 4, 3, 4, 4), torch.zeros(8, 3, 4), scheduler, generator,
                      timestep_weights=only_late)  # fmt: skip
    drawn = torch.cat(seen)
    assert drawn.min() >= 900 and len(drawn.unique()) > 20


def test_motion_weight_counts_the_loss_more_where_frames_change() -> None:
    latents = torch.zeros(1, 4, 3, 4, 4)
    latents[:, :, 1:, 0, 0] = 2.0  # one latent pixel changes after frame 0; the rest stays still
    weights = motion_weights(latents, 3.0)
    mean_change = 2.0 / 16  # over frames 1.. and every pixel
    assert weights.shape == (1, 1, 3, 4, 4) and weights[0, 0, 1, 0, 0] == pytest.approx(
        1 + 3 * 2.0 / mean_change
    )
    assert torch.all(weights[:, :, 0] == 1) and torch.all(weights[0, 0, 1:, 1:, 1:] == 1)
    assert torch.all(motion_weights(torch.ones(1, 4, 3, 4, 4), 3.0) == 1)  # a still clip: plain MSE

    class WrongAt(torch.nn.Module):  # predicts the noise exactly, off by 1 at one latent pixel
        def __init__(self, y: int, x: int) -> None:
            super().__init__()
            self.y, self.x = y, x

        def forward(self, x, t, ctx):
            out = noise.clone()
            out[:, :, :, self.y, self.x] += 1
            return out

    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

    def loss(y: int, x: int, strength: float) -> float:
        return float(lookback_loss(WrongAt(y, x), latents, torch.zeros(1, 3, 4), scheduler,
                                   torch.Generator().manual_seed(0), motion_weight=strength))  # fmt: skip

    assert loss(0, 0, 0.0) == pytest.approx(loss(3, 3, 0.0)) == pytest.approx(1 / 16)  # plain MSE
    assert loss(0, 0, 3.0) > 10 * loss(3, 3, 3.0)  # the same error weighs more where things move


def test_timestep_bias_and_chunking_are_recorded_and_checked(setup, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    flags = ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "3", "--horizon_frames", "12",
             "--context_frames", "5"]  # fmt: skip
    assert train_main(train_args(setup, out, "--max_train_steps", "1", *flags)) == 0
    header = read_temporal_header(out / "lookback_weights.safetensors")
    assert header.training["timestep_bias"] == {"strategy": "later", "multiplier": 3.0, "portion": 0.25}
    assert (header.horizon_frames, header.context_frames) == (12, 5) and header.training[
        "motion_loss_weight"
    ] == 0
    for bad, message in (
        (["--timestep_bias_multiplier", "0"], "--timestep_bias_multiplier must be a number in 1e-06..1e+06"),
        (["--timestep_bias_portion", "1.5"], "--timestep_bias_portion must be a number in (0, 1]"),
        (["--timestep_bias_begin", "500", "--timestep_bias_end", "400"], "must be below --timestep_bias_end"),
        (["--horizon_frames", "1"], "--horizon_frames must be"),
        (
            ["--context_frames", "3"],
            "--context_frames: context_frames (3) must be below horizon_frames (None)",
        ),
        (["--horizon_frames", "8", "--context_frames", "8"], "must be below horizon_frames (8)"),
        (["--motion_loss_weight", "-1"], "--motion_loss_weight must be a number in 0..10000"),
    ):
        with pytest.raises(SystemExit):
            train_main(train_args(setup, tmp_path / "bad", "--max_train_steps", "1", *bad))
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _without_preset(args: list[str]) -> list[str]:
    at = args.index("--preset")
    return args[:at] + args[at + 2 :]


def test_init_lookback_weights_starts_from_the_file_and_takes_its_modules(setup, tmp_path, caplog) -> None:
    from lookback_core.sd15 import load_sd15

    unet = load_sd15(setup["checkpoint"], config_dir=setup["config_dir"]).unet
    start = create_lookback_unet(unet, replace(preset("light"), depth=2))
    torch.manual_seed(1)
    for p in start.temporal.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_temporal_weights(tmp_path / "start.safetensors", start.temporal)
    out = tmp_path / "run"
    extra = ["--max_train_steps", "1", "--learning_rate", "1e-12", "--init_lookback_weights",
             str(tmp_path / "start.safetensors")]  # fmt: skip
    assert train_main(_without_preset(train_args(setup, out, *extra))) == 0
    header = read_temporal_header(out / "lookback_weights.safetensors")
    assert header.config == start.config  # d=2 from the file, not the default preset's d=5
    assert header.training["init_lookback_weights"] == "start.safetensors" and "preset" not in header.training
    trained = load_lookback_unet(out / "lookback_weights.safetensors", unet).temporal.state_dict()
    for name, value in start.temporal.state_dict().items():
        assert torch.allclose(trained[name], value, atol=1e-8), name  # one step at lr 1e-12 from the file
    # a run of the flags' modules is not continued with the file's
    other = tmp_path / "other"
    assert train_main(train_args(setup, other, "--max_train_steps", "1")) == 0
    resumed = _without_preset(train_args(setup, other, *extra, "--resume_from_checkpoint", "latest"))
    assert train_main(resumed) == 2
    assert (
        f"asks for d=2 k=3 at 21 sites (--init_lookback_weights {tmp_path / 'start.safetensors'})"
        in caplog.text
    )


def test_init_lookback_weights_refuses_module_flags_and_reports_a_bad_file(
    setup, tmp_path, capsys, caplog
) -> None:
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as exit_info:
        train_main(
            train_args(setup, tmp_path / "run", "--init_lookback_weights", str(weights), "--no_adapter")
        )
    assert exit_info.value.code == 2
    assert "leave out --preset, --no_adapter" in capsys.readouterr().err
    args = _without_preset(train_args(setup, tmp_path / "run", "--init_lookback_weights", str(weights)))
    with pytest.raises(SystemExit) as exit_info:  # its header is read with the flags, before any model loads
        train_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--init_lookback_weights: temporal weights file '{weights}'" in err
    assert "Traceback" not in err + caplog.text and not (tmp_path / "run").exists()


def test_validation_writes_video_and_logs_isim(setup, tmp_path) -> None:
    image = tmp_path / "start.png"
    iio.imwrite(image, toy_frames(5, size=40)[0])
    out = tmp_path / "run"
    extra = ["--max_train_steps", "2", "--validation_image", str(image), "--validation_prompt", "a square",
             "--validation_steps", "2", "--validation_frames", "3", "--validation_inference_steps", "2"]  # fmt: skip
    assert train_main(train_args(setup, out, *extra)) == 0
    assert (out / "validation" / "step-0000002.mp4").is_file()
    assert not (out / "validation" / "step-0000002").exists()  # one pair: its video is the step's
    last = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["isim_latent_first"] == pytest.approx(1.0)
    assert -1 <= last["isim_latent_avg"] <= 1 and "isim_latent_decay" in last


def test_several_validation_pairs_make_a_grid_video_from_step_zero(setup, tmp_path) -> None:
    """Three image/prompt pairs: one grid video per validation step (the untrained modules' at step
    0 too), each pair's video alone beside it, and the ISIM of each pair and their mean."""
    images = []
    for k in range(3):
        images.append(tmp_path / f"start{k}.png")
        iio.imwrite(images[-1], toy_frames(5 + k, size=40)[0])
    out = tmp_path / "run"
    pairs = [token for k, path in enumerate(images) for token in ("--validation_image", str(path),
                                                                    "--validation_prompt", f"prompt {k}")]  # fmt: skip
    extra = ["--max_train_steps", "2", *pairs, "--validation_at_start", "--validation_steps", "2",
             "--validation_frames", "3", "--validation_inference_steps", "2"]  # fmt: skip
    assert train_main(train_args(setup, out, *extra)) == 0
    for step in (0, 2):
        grid = iio.imread(out / "validation" / f"step-{step:07d}.mp4")
        assert grid.shape == (3, 32, 3 * 32, 3)  # 3 frames of 32x32, side by side
        for k in range(3):
            alone = iio.imread(out / "validation" / f"step-{step:07d}" / f"{k}.mp4")
            assert alone.shape == (3, 32, 32, 3)
            assert np.abs(alone.astype(int) - grid[:, :, 32 * k : 32 * (k + 1)]).mean() < 6  # its tile
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    validations = {entry["step"]: entry for entry in logged if "isim_latent_avg" in entry}
    assert sorted(validations) == [0, 2]
    for entry in validations.values():
        each = [entry[f"isim_latent_avg_{k}"] for k in range(3)]
        assert entry["isim_latent_avg"] == pytest.approx(sum(each) / 3)
        assert len(set(each)) == 3  # three different videos


def test_hybrid_noising_keeps_frame_zero_clean_and_loss_skips_it() -> None:
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    latents = torch.randn(2, 4, 5, 8, 8)
    noise = torch.randn_like(latents)
    noisy = hybrid_noisy_latents(latents, noise, torch.tensor([500, 999]), scheduler)
    assert torch.equal(noisy[:, :, 0], latents[:, :, 0])
    assert not torch.allclose(noisy[:, :, 1:], latents[:, :, 1:])

    class WrongOnFrameZero(torch.nn.Module):  # predicts zeros, and 1e6 on frame 0
        def forward(self, x, t, ctx):
            out = torch.zeros_like(x)
            out[:, :, 0] = 1e6
            return out

    generator = torch.Generator().manual_seed(0)
    loss = lookback_loss(WrongOnFrameZero(), latents, torch.zeros(2, 3, 4), scheduler, generator)
    assert 0.5 < loss < 2  # the mean square of unit noise on frames 1..: frame 0 is not in the loss
    # the plain DDPM objective (an ablation) noises frame 0 too and counts it
    seen = []

    class Recorder(WrongOnFrameZero):
        def forward(self, x, t, ctx):
            seen.append(x.clone())
            return super().forward(x, t, ctx)

    loss = lookback_loss(Recorder(), latents, torch.zeros(2, 3, 4), scheduler, generator, objective="ddpm")
    assert loss > 1e10 and not torch.equal(seen[0][:, :, 0], latents[:, :, 0])
    with pytest.raises(ValueError, match="objective must be"):
        lookback_loss(Recorder(), latents, torch.zeros(2, 3, 4), scheduler, generator, objective="other")


def test_overfit_on_a_repeated_batch_loss_falls() -> None:
    model = create_lookback_unet(make_tiny_unet(), preset("light"))
    model.unet.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 8, 8, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    optimizer = torch.optim.AdamW(model.temporal.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = lookback_loss(model, latents, text, scheduler, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("checkpointing", ["none", "all"])
def test_gradients_reach_only_the_temporal_modules(checkpointing) -> None:
    model = create_lookback_unet(make_tiny_unet(), preset("light"))
    model.unet.requires_grad_(False)
    if checkpointing == "all":
        model.unet.enable_gradient_checkpointing()
        model.checkpoint_sites = set(model.config.sites)
    model.train()
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    loss = lookback_loss(model, torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32), scheduler)
    loss.backward()
    assert all(p.grad is None for p in model.unet.parameters())
    for site, module in model.temporal.items():
        # zero-initialised convs still get gradients (the input is not zero) at every site
        assert module.lookback.weight.grad is not None and module.lookback.weight.grad.abs().sum() > 0, site


def test_data_sources_and_skipped_samples(setup, tmp_path) -> None:
    root = tmp_path / "mixed"
    write_toy_videos(root, 2, frames=10, size=40)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    write_video(toy_frames(9, frames=3, size=40), root / "short.mp4", fps=8)
    frames_dir = root / "frames_clip"
    frames_dir.mkdir()
    for i, frame in enumerate(toy_frames(3, frames=10, size=40)):
        iio.imwrite(frames_dir / f"{i:04d}.png", frame)
    (frames_dir / "caption.txt").write_text("a folder of frames")
    samples = discover_samples(root)
    assert sorted(s.path.name for s in samples) == [
        "clip_000.mp4",
        "clip_001.mp4",
        "corrupt.mp4",
        "frames_clip",
        "short.mp4",
    ]
    assert {s.path.name: s.caption for s in samples}["frames_clip"] == "a folder of frames"
    dataset = square_dataset(root)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixels"].shape == (5, 4, 3, 32, 32)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    reasons = {Path(p).name: r for p, r in batch["skipped"]}
    assert reasons == {"corrupt.mp4": "unreadable", "short.mp4": "too short"}

    # WebVid layout: <root>/<page_dir>/<videoid>.mp4 with captions in the CSV
    webvid = tmp_path / "webvid"
    write_toy_videos(webvid / "001_page", 2, frames=10, size=40)
    table = tmp_path / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "name", "page_dir"])
        writer.writerow(["clip_000", "first caption", "001_page"])
        writer.writerow(["clip_001", "second caption", "001_page"])
    samples = discover_samples(webvid, table)
    assert [s.caption for s in samples] == ["first caption", "second caption"]
    assert square_dataset(webvid, table)[1]["caption"] == "second caption"


def test_stride_follows_fps_when_a_reference_fps_is_given(tmp_path) -> None:
    write_video(toy_frames(0, frames=30, size=40), tmp_path / "fast.mp4", fps=16)
    plain, scaled = square_dataset(tmp_path), square_dataset(tmp_path, reference_fps=8)
    assert plain.locate(plain.items[0], 0)[1] == 2
    assert scaled.locate(scaled.items[0], 0)[1] == 4


def test_latent_cache_is_used_on_the_second_epoch(setup, tmp_path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert train_main(train_args(setup, out, "--max_train_steps", "8", "--cache_dir", str(cache))) == 0
    entries = list(cache.rglob("*.safetensors"))
    assert len(entries) == 8  # one clip per video, encoded once although each was used twice
    entry = load_file(entries[0])
    assert entry["latents"].shape == (4, 4, 4, 4) and entry["text"].shape == (77, 32)


def test_latent_cache_folder_changes_with_the_latent_scale(setup, tmp_path) -> None:
    """Latents cached at one VAE scaling factor are never reused at another."""
    import shutil

    config_dir = shutil.copytree(setup["config_dir"], tmp_path / "configs")
    vae_config = config_dir / "vae" / "config.json"
    before = checkpoint_fingerprint(setup["checkpoint"], config_dir, torch.float32)
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0.779}))
    assert checkpoint_fingerprint(setup["checkpoint"], config_dir, torch.float32) != before


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(
    setup, tmp_path, caplog, monkeypatch
) -> None:
    import training.train as train_module

    real_loss, calls = train_module.lookback_loss, []

    def breaking_at_step_3(*args, **kwargs):  # every learning rate the flags allow keeps this tiny run finite
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train_module, "lookback_loss", breaking_at_step_3)
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "6", "--checkpointing_steps", "1")
    assert train_main(args) == 3
    assert "at step 3" in caplog.text
    assert "the loss became" in caplog.text and "last good checkpoint" in caplog.text
    kept = checkpoints.complete_checkpoints(out)
    assert kept, "the checkpoint written before the loss broke is kept"
    state = load_file(kept[-1] / "lookback_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def _train_subprocess(setup, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "training" / "train.py"),
           *train_args(setup, out, "--max_train_steps", str(steps), "--checkpointing_steps", "2", *extra)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_killed_run_resumes_where_it_stopped(setup, tmp_path) -> None:
    steps = 10
    straight = _train_subprocess(setup, tmp_path / "straight", steps)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    out = tmp_path / "killed"
    run = _train_subprocess(setup, out, steps)
    wait_for_checkpoint(run, out, 2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / f"checkpoint-{steps}").exists(), "the kill came too late to test anything"
    # what a run killed while saving leaves behind: an unfinished folder and one without its marker
    (out / "checkpoint-12.tmp").mkdir()
    (out / "checkpoint-14").mkdir()
    assert checkpoints.find_checkpoint(out, "latest").name != "checkpoint-14"

    resumed = _train_subprocess(setup, out, steps, "--resume_from_checkpoint", "latest")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    resumed_from = int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_from >= 2 and resumed_from % 2 == 0
    assert not (out / "checkpoint-12.tmp").exists() and not (out / "checkpoint-14").exists()
    steps_logged = [
        json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged[-(steps - resumed_from) :] == list(range(resumed_from + 1, steps + 1))
    # optimizer, lr scheduler, data order and RNG all continued: the same weights as the straight run
    assert_same_weights(
        tmp_path / "straight" / "lookback_weights.safetensors", out / "lookback_weights.safetensors"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noising_is_fp32_whatever_the_training_precision(dtype, monkeypatch) -> None:
    """At t=0 and t=1 in bf16, sqrt(1 - alpha_bar) rounds to 0: the model input must still carry
    the noise, exactly as fp64 arithmetic gives it (up to the input's own rounding)."""
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    latents = torch.randn(4, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    timesteps = torch.tensor([0, 1, 10, 999])
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: timesteps)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, ctx):
            seen["x"] = x
            return torch.zeros_like(x)

    lookback_loss(
        Spy(), latents, torch.zeros(4, 3, 4, dtype=dtype), scheduler, torch.Generator().manual_seed(0), dtype
    )
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).double()
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1, 1)
    exact = (alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise)[:, :, 1:]
    got = seen["x"][:, :, 1:]
    assert got.dtype == dtype
    # the fp64 value, rounded to the input dtype (one unit in the last place at most)
    torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert not torch.equal(got[:2], latents[:2, :, 1:])  # t=0 and t=1 are noised
