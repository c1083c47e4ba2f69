"""The pack inside a real ComfyUI server, end to end on CPU.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout whose requirements are installed in
the Python named by ``COMFYUI_PYTHON`` (default: this one). The server runs on loopback with a
temporary base directory (models, input, output, custom_nodes with this pack linked in), so
the checkout itself is not touched. ComfyUI refuses tiny checkpoints, so a full-size SD1.5
checkpoint with random weights is generated (about 2 GB, fp16).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from ldm_checkpoint import write_random_sd15_checkpoint
from safetensors.torch import save_file

from lookback_core.config import FORMAT_VERSION, LookBackConfig
from lookback_core.video_io import read_video
from lookback_core.weights import BASE_FAMILY, FORMAT_TAG

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
REPO = Path(__file__).parents[1]
SIZE, FRAMES = 64, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_small_weights(path: Path) -> None:
    """Temporal weights for full SD1.5 channels, on two sites only, with random small values."""
    config = LookBackConfig(depth=2, kernel=1, adapter_kernel=1, sites=("middle", "output.11"),
                            channels={"middle": 1280, "output.11": 320})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for site, n in config.channels.items():
        shapes = {"lookback.weight": (n, 2 * n, 1, 1), "lookback.bias": (n,), "mix.weight": (n, n, 1, 1),
                  "mix.bias": (n,), "adapter.weight": (n, 1, 1, 1, 1), "adapter.bias": (n,)}  # fmt: skip
        for name, shape in shapes.items():
            tensors[f"{site}.{name}"] = torch.randn(shape, generator=g) * 0.01
    metadata = {"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION), "config": config.to_json(),
                "base_family": BASE_FAMILY, "training": "{}"}  # fmt: skip
    save_file(tensors, path, metadata=metadata)


def _request(port: int, path: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data), timeout=30
    ) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("models/checkpoints", "models/lookback", "input", "output", "custom_nodes"):
        (base / sub).mkdir(parents=True)
    write_random_sd15_checkpoint(base / "models/checkpoints/sd15_random.safetensors")
    _write_small_weights(base / "models/lookback/lookback_small.safetensors")
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([xs * 4, ys * 4, (xs + ys) * 2], -1).astype(np.uint8) + rng.integers(
        0, 8, (SIZE, SIZE, 3), dtype=np.uint8
    )
    iio.imwrite(base / "input/start.png", image)
    (base / "custom_nodes" / "comfyui-lookback-i2v").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-api-nodes", "--database-url", "sqlite:///:memory:"],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (base / "server.log").read_text()[-4000:]
            try:
                info = _request(port, "/object_info/LookBackSampler")
                break
            except OSError:
                assert time.time() < deadline, "ComfyUI did not start in 300 s"
                time.sleep(1)
        assert "LookBackSampler" in info, "the pack's nodes were not loaded"
        yield {"port": port, "base": base, "log": base / "server.log"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _run(server, prompt: dict) -> dict:
    prompt_id = _request(server["port"], "/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.time() + 1200
    while time.time() < deadline:
        history = _request(server["port"], f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            assert entry["status"]["status_str"] == "success", (
                json.dumps(entry["status"])[-4000:] + server["log"].read_text()[-4000:]
            )
            return entry["outputs"]
        time.sleep(2)
    raise AssertionError("the workflow did not finish in 20 minutes")


def test_api_workflow_runs_end_to_end(server) -> None:
    prompt = json.loads((REPO / "workflows" / "lookback_i2v_api.json").read_text())
    for node in prompt.values():
        node.pop("_meta", None)
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = "sd15_random.safetensors"
        if node["class_type"] == "LookBackModelLoader":
            inputs["lookback_name"] = "lookback_small.safetensors"
        if node["class_type"] == "LoadImage":
            inputs["image"] = "start.png"
        if node["class_type"] == "ImageScale":
            inputs["width"] = inputs["height"] = SIZE
        if node["class_type"] == "LookBackSampler":
            inputs.update(frames=FRAMES, steps=2)
    # The same image through ComfyUI's VAE alone, saved losslessly: what frame 0 must show.
    roundtrip = copy.deepcopy({k: prompt[k] for k in ("1", "5", "6")})
    roundtrip["20"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}}
    roundtrip["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    roundtrip["22"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["21", 0], "filename_prefix": "roundtrip"},
    }

    outputs = _run(server, prompt)
    video_entry = next(
        o for o in outputs.values() if "images" in o and o["images"][0]["filename"].endswith(".mp4")
    )
    video = read_video(
        server["base"]
        / "output"
        / video_entry["images"][0]["subfolder"]
        / video_entry["images"][0]["filename"]
    )
    assert video.shape == (FRAMES, SIZE, SIZE, 3)

    saved = _run(server, roundtrip)["22"]["images"][0]
    expected = iio.imread(server["base"] / "output" / saved["subfolder"] / saved["filename"])[..., :3].astype(
        np.float32
    )
    frame0_error = np.abs(video[0].astype(np.float32) - expected).mean()
    later_error = np.abs(video[-1].astype(np.float32) - expected).mean()
    assert frame0_error < 12 and frame0_error < later_error, (frame0_error, later_error)
