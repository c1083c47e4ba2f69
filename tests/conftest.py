"""Shared fixtures: tiny models of the real SD1.5 architectures (small channel counts)."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from lookback_core.tiny import TINY_UNET_CONFIG

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes (pytest -n): one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes a test starts too, so none oversubscribes the cores
    torch.set_num_threads(1)
elif not os.environ.get("OMP_NUM_THREADS"):  # set: as asked (one thread beside a long training run)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_sessionfinish(session, exitstatus) -> None:
    """With ``LOOKBACK_REQUIRE_COMFYUI=1`` (CI's run of the real-ComfyUI tests) a skipped test fails the run."""
    if os.environ.get("LOOKBACK_REQUIRE_COMFYUI") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped or not session.testscollected:
        reporter.write_line(
            f"LOOKBACK_REQUIRE_COMFYUI=1: {skipped} test(s) skipped, {session.testscollected} collected; "
            "every real-ComfyUI test must run here (is COMFYUI_PATH set?)",
            red=True,
        )
        session.exitstatus = 1


# Python that evaluates to this process's own peak resident memory in bytes, for child processes
# whose peak a test bounds. Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss does not (it
# keeps the forked test runner's peak, which would make the bound depend on the tests before).
PEAK_RSS_EXPRESSION = (
    "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
)


def make_tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    return make_tiny_unet()


def randomize(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give zero-initialised look-back modules random weights, so tests see them act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict:
    """A tiny SD1.5 LDM checkpoint, its config folder, and a temporal weights file for it
    (preset ``light``, small random weights, training facts ``{"frames": 4}``)."""
    from lookback_core.config import preset
    from lookback_core.sd15 import load_sd15
    from lookback_core.temporal_unet import create_lookback_unet
    from lookback_core.tiny import tiny_config_dir, write_tiny_sd15_checkpoint
    from lookback_core.weights import save_temporal_weights

    root = tmp_path_factory.mktemp("tiny_files")
    config_dir = tiny_config_dir(root)
    checkpoint = write_tiny_sd15_checkpoint(root / "tiny_sd15.safetensors", config_dir=config_dir)
    model = create_lookback_unet(load_sd15(checkpoint, config_dir=config_dir).unet, preset("light"))
    randomize(model.temporal, scale=0.02)
    weights = save_temporal_weights(root / "lookback.safetensors", model, training={"frames": 4})
    return {"root": root, "config_dir": config_dir, "checkpoint": checkpoint, "weights": weights}


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> dict:
    """For trainer runs: a tiny SD1.5 checkpoint, its config folder and 8 toy-world videos."""
    from toy_clips import write_toy_videos

    from lookback_core.tiny import tiny_config_dir, write_tiny_sd15_checkpoint

    root = tmp_path_factory.mktemp("train")
    config_dir = tiny_config_dir(root)
    checkpoint = write_tiny_sd15_checkpoint(root / "tiny.safetensors", config_dir=config_dir)
    data = write_toy_videos(root / "videos", 8, frames=10, size=40)
    return {"root": root, "config_dir": config_dir, "checkpoint": checkpoint, "data": data}


def train_args(setup: dict, output_dir, *extra: str) -> list[str]:
    """``training/train.py`` arguments for a tiny, fast run on ``setup``'s model and videos."""
    return [
        "--pretrained_model", str(setup["checkpoint"]),
        "--config_dir", str(setup["config_dir"]),
        "--train_data_dir", str(setup["data"]),
        "--output_dir", str(output_dir),
        "--preset", "light",
        "--resolution", "32",
        "--num_frames", "4",
        "--frame_stride", "2",
        "--train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def wait_for_checkpoint(run, output_dir, step: int, timeout: float = 240) -> None:
    """Poll until ``checkpoint-<step>`` of a training subprocess ``run`` is complete."""
    import time
    from pathlib import Path

    from training import checkpoints

    marker = Path(output_dir) / f"checkpoint-{step}" / checkpoints.COMPLETE_MARKER
    deadline = time.time() + timeout
    while not marker.is_file():
        assert run.poll() is None and time.time() < deadline, f"the run ended before checkpoint-{step}"
        time.sleep(0.02)


def assert_same_weights(a, b) -> None:
    """Two weights files hold the same tensors (to float rounding: resumed runs reorder nothing else)."""
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="session")
def random_sd15(tmp_path_factory):
    """A full-size SD1.5 LDM checkpoint with random weights (about 2 GB, fp16), for the tests in a
    real ComfyUI, which refuses tiny checkpoints."""
    from ldm_checkpoint import write_random_sd15_checkpoint

    return write_random_sd15_checkpoint(tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors")
