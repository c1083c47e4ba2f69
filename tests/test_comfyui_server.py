"""The pack inside a real ComfyUI server: the shipped API workflow, end to end on CPU.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout whose requirements are installed in
the Python named by ``COMFYUI_PYTHON`` (default: this one). The server runs on loopback with a
temporary base directory (models, input, output, custom_nodes with this pack linked in), so
the checkout itself is not touched. ComfyUI refuses tiny checkpoints, so a full-size SD1.5
checkpoint with random weights is generated (about 2 GB, fp16), with a random LoRA for it.
"""

from __future__ import annotations

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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lookback_core.config import FORMAT_VERSION, LookBackConfig
from lookback_core.video_io import read_metadata, read_video, video_info
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
    """Temporal weights for full SD1.5 channels, at one site of each patch point, small random values."""
    channels = {"input.1": 320, "middle": 1280, "output.3": 1280, "output.11": 320}
    config = LookBackConfig(depth=2, kernel=1, adapter_kernel=1, sites=tuple(channels), channels=channels)
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


def _write_crafted_weights(path: Path) -> None:
    """The small weights with training facts a crafted file could hold: a latent scale that is a
    string (formatting it raised in the weights' repr, which ComfyUI calls in its error handler)."""
    _write_small_weights(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    save_file(
        load_file(path), path, metadata={**metadata, "training": '{"latent_scale": "x", "context_dim": 768}'}
    )


def _write_lora(path: Path) -> None:
    """A rank-4 LoRA (kohya keys) on one UNet attention layer, strong enough to change every frame."""
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(1)
    save_file({f"{key}.lora_down.weight": torch.randn(4, 320, generator=g),
               f"{key}.lora_up.weight": torch.randn(320, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)}, path)  # fmt: skip


def _request(port: int, path: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data), timeout=30
    ) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_sd15):
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("models/checkpoints", "models/loras", "models/lookback", "input", "output", "custom_nodes"):
        (base / sub).mkdir(parents=True)
    (base / "models/checkpoints/sd15_random.safetensors").symlink_to(random_sd15)
    _write_small_weights(base / "models/lookback/lookback_small.safetensors")
    _write_crafted_weights(base / "models/lookback/lookback_crafted.safetensors")
    _write_lora(base / "models/loras/test_lora.safetensors")
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
                info = _request(port, "/object_info/LookBackApply")
                break
            except OSError:
                assert time.time() < deadline, "ComfyUI did not start in 300 s"
                time.sleep(1)
        assert "LookBackApply" in info, "the pack's nodes were not loaded"
        yield {"port": port, "base": base, "log": base / "server.log"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _finished(server, prompt: dict, timeout: float = 1200) -> dict:
    """The history entry of ``prompt`` once ComfyUI has run it."""
    prompt_id = _request(server["port"], "/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _request(server["port"], f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(1)
    raise AssertionError(
        f"the workflow did not finish in {timeout:.0f} s; the server's log ends: "
        + server["log"].read_text()[-3000:]
    )


def _run(server, prompt: dict) -> dict:
    entry = _finished(server, prompt)
    assert entry["status"]["status_str"] == "success", (
        json.dumps(entry["status"])[-4000:] + server["log"].read_text()[-4000:]
    )
    return entry["outputs"]


def _api_workflow(name: str) -> dict:
    prompt = json.loads((REPO / "workflows" / "api" / name).read_text())
    for node in prompt.values():
        node.pop("_meta", None)
    return prompt


def _shipped_prompt(lora_strength: float | None = None, **changes) -> dict:
    """The shipped API workflow on the test's files; ``changes``: class_type -> inputs to set.

    ``lora_strength``: un-bypass its LoRA node (as a user does with Ctrl+B) with the test LoRA at
    that strength, between the checkpoint and everything that uses its MODEL and CLIP."""
    prompt = _api_workflow("lookback_i2v_api.json")
    files = {"ckpt_name": "sd15_random.safetensors", "lookback_name": "lookback_small.safetensors",
             "image": "start.png"}  # fmt: skip
    checkpoint = next(k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple")
    for node in prompt.values():
        inputs = node["inputs"]
        inputs.update({k: v for k, v in files.items() if isinstance(inputs.get(k), str)})  # not links
        inputs.update(changes.get(node["class_type"], {}))
        if lora_strength is not None:
            inputs.update(
                {k: ["lora", v[1]] for k, v in inputs.items() if v in ([checkpoint, 0], [checkpoint, 1])}
            )
    if lora_strength is not None:
        prompt["lora"] = {"class_type": "LoraLoader", "inputs": {
            "model": [checkpoint, 0], "clip": [checkpoint, 1], "lora_name": "test_lora.safetensors",
            "strength_model": lora_strength, "strength_clip": 0.0}}  # fmt: skip
    return prompt


def _video(server, outputs: dict) -> np.ndarray:
    entry = next(o for o in outputs.values() if "images" in o and o["images"][0]["filename"].endswith(".mp4"))
    saved = entry["images"][0]
    return read_video(server["base"] / "output" / saved["subfolder"] / saved["filename"])


SMALL = {"ImageScale": {"width": SIZE, "height": SIZE}, "LookBackImageToVideo": {"frames": FRAMES},
         "KSampler": {"steps": 3}}  # fmt: skip


_ROUNDTRIPS: dict[int, np.ndarray] = {}


def _roundtrip(server, size: int) -> np.ndarray:
    """The start image scaled to ``size`` through ComfyUI's VAE alone (which crops to multiples of
    8 as Look-Back Image To Video does), saved losslessly: what frame 0 must show."""
    if size not in _ROUNDTRIPS:
        prompt = _shipped_prompt(ImageScale={"width": size, "height": size})
        graph = {k: prompt[k] for k in ("1", "7", "8")}
        graph["20"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
        graph["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
        graph["22"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["21", 0], "filename_prefix": "roundtrip"},
        }
        saved = _run(server, graph)["22"]["images"][0]
        image = iio.imread(server["base"] / "output" / saved["subfolder"] / saved["filename"])
        _ROUNDTRIPS[size] = image[..., :3].astype(np.float32)
    return _ROUNDTRIPS[size]


def _check_frames(video: np.ndarray, roundtrip: np.ndarray) -> None:
    assert video.shape == (FRAMES, SIZE, SIZE, 3)
    frame0_error = np.abs(video[0].astype(np.float32) - roundtrip).mean()
    later_error = np.abs(video[-1].astype(np.float32) - roundtrip).mean()
    assert frame0_error < 12 and frame0_error < later_error, (frame0_error, later_error)


def test_shipped_workflow_runs_as_shipped_and_a_lora_reaches_the_unet(server) -> None:
    roundtrip = _roundtrip(server, SIZE)
    shipped = _run(server, _shipped_prompt(**SMALL))  # the LoRA node bypassed, as shipped
    off = _video(server, shipped)
    _check_frames(off, roundtrip)
    zero = _video(server, _run(server, _shipped_prompt(0.0, **SMALL)))
    assert np.abs(zero.astype(np.float32) - off).mean() < 0.5  # a LoRA at strength 0 changes nothing
    on = _video(server, _run(server, _shipped_prompt(1.0, **SMALL)))
    _check_frames(on, roundtrip)
    assert np.abs(on[0].astype(np.float32) - off[0]).mean() < 2  # frame 0 is the image either way
    assert np.abs(on[1:].astype(np.float32) - off[1:]).mean() > 2  # the LoRA changed frames 1..
    # the mp4 carries the prompt and the workflow where ComfyUI looks when it is dropped on the canvas
    entry = next(o for o in shipped.values() if "images" in o)["images"][0]
    tags = read_metadata(server["base"] / "output" / entry["subfolder"] / entry["filename"])
    assert json.loads(tags["prompt"])["10"]["class_type"] == "KSampler"


def test_toy_template_runs_with_nothing_to_download(server) -> None:
    """The toy template as shipped (its checkpoint, weights and start image come with the pack):
    16 frames that keep the held-out start image and move its object the captioned way ("a blue
    square moving down"; the model shipped before commit 6867415 moved it left). Its clip and seed
    are the demo's, so the frames are the command line's (docs/comfyui.md#one-seed-one-video)."""
    from toyworld import world
    from toyworld.metrics import clip_metrics

    clip = world.make_clip(world.HELD_OUT_SEED)  # the template's clip_number 0
    video = _video(server, _run(server, _api_workflow("lookback_toy_i2v_api.json")))
    assert video.shape == (world.FRAMES, world.SIZE, world.SIZE, 3)
    metrics = clip_metrics(video, clip.frames[0], clip.rgb, clip.direction)
    # measured through the mp4 (H.264 on top of the VAE; commit 6867415+): frame 0 29.0 dB, persistence
    # 1.00, 30.0 px down at 1.88 px/frame (the demo, from the tensors: 29.7 px, 1.90), drift 3.8
    assert metrics.frame0_psnr > 25 and metrics.persistence >= 0.9, metrics
    assert metrics.direction_ok and metrics.speed > 1.5, metrics


def test_core_save_video_takes_the_packs_video(server) -> None:
    """Look-Back Video Combine's VIDEO output into ComfyUI's own Save Video, on the shipped toy: the
    core node writes the same frames at the frame rate set on the pack's node."""
    prompt = _api_workflow("lookback_toy_i2v_api.json")
    prompt["7"]["inputs"]["frames"] = 6
    prompt["8"]["inputs"]["steps"] = 4
    prompt["10"]["inputs"]["frame_rate"] = 12.5
    prompt["11"] = {"class_type": "SaveVideo", "inputs": {"video": ["10", 1], "filename_prefix": "video/core",
                                                          "format": "mp4", "format.codec": "auto"}}  # fmt: skip
    outputs = _run(server, prompt)
    ours, core = ((server["base"] / "output" / e["subfolder"] / e["filename"]) for e in
                  (outputs[node]["images"][0] for node in ("10", "11")))  # fmt: skip
    assert core.suffix == ".mp4" and core.parent.name == "video"
    info = video_info(core)
    assert (info.frames, info.fps, info.width, info.height) == (6, 12.5, 64, 64), info
    ours_frames, core_frames = read_video(ours).astype(np.float32), read_video(core).astype(np.float32)
    # the same frames, in order, through two H.264 encoders: measured 1.9-2.2 levels apart per frame,
    # 3.9 and more from any other frame of the clip
    apart = np.abs(core_frames[:, None] - ours_frames[None]).mean(axis=(2, 3, 4))
    assert list(apart.argmin(axis=1)) == list(range(6)) and apart.diagonal().max() < 3, apart
    assert json.loads(read_metadata(core)["prompt"])["11"]["class_type"] == "SaveVideo"


def test_toy_weights_on_a_full_size_sd15_are_refused_by_their_own_facts(server) -> None:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random.safetensors"}},
        "2": {"class_type": "LookBackWeightsLoader", "inputs": {"lookback_name": "lookback_toy.safetensors"}},
        "3": {"class_type": "LookBackApply", "inputs": {"model": ["1", 0], "lookback_weights": ["2", 0]}},
        "4": {"class_type": "LookBackImageToVideo", "inputs": {"vae": ["1", 2], "image": ["5", 0], "frames": 2}},
        "5": {"class_type": "LookBackToyStartImage", "inputs": {"clip_number": 0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["6", 0], "negative": ["6", 0],
              "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "LookBackVideoCombine", "inputs": {"images": ["9", 0], "frame_rate": 8.0,
              "filename_prefix": "refused", "format": "image/gif", "loop_count": 0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    }  # fmt: skip
    entry = _finished(server, prompt)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    message = error["exception_message"]
    assert "does not fit the look-back weights lookback_toy.safetensors" in message, message
    assert "text context of 64 channels; this model's has 768" in message, message
    assert "trained on SD1.5" not in message and len(message) < 3000


def test_dpmpp_2m_karras_from_an_odd_sized_image_keeps_frame_zero_the_image(server) -> None:
    odd = {"ImageScale": {"width": SIZE + 4, "height": SIZE + 4},
           "KSampler": {"steps": 3, "sampler_name": "dpmpp_2m", "scheduler": "karras"}}  # fmt: skip
    video = _video(server, _run(server, _shipped_prompt(**SMALL | odd)))
    _check_frames(video, _roundtrip(server, SIZE + 4))  # both cropped to SIZE
    assert "centre-cropped to 64x64" in server["log"].read_text()


def test_a_crafted_weights_file_is_a_named_error_and_the_server_runs_the_next_prompt(server) -> None:
    """A weights file whose training facts are crafted (a latent scale that is a string) is refused by
    name in the error ComfyUI shows; its error handler formats every input of the failed node, and
    nothing the pack hands it raises there, so the prompt worker lives on and runs a good prompt."""
    entry = _finished(
        server,
        _shipped_prompt(**SMALL, LookBackWeightsLoader={"lookback_name": "lookback_crafted.safetensors"}),
    )
    assert entry["status"]["status_str"] == "error", entry["status"]
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    message = error["exception_message"]
    assert error["node_type"] == "LookBackWeightsLoader" and error["exception_type"].endswith(
        "TemporalWeightsError"
    )
    assert "lookback_crafted.safetensors': its training metadata is invalid (training.latent_scale must be a number in (0, 1000]" in message, message  # fmt: skip
    assert "got 'x'" in message and "Traceback" not in message
    # the same server, the same worker: a good prompt still runs (a worker stopped by its own error handler
    # would leave it queued for ever)
    good = _finished(server, _shipped_prompt(**SMALL), timeout=600)
    assert good["status"]["status_str"] == "success", json.dumps(good["status"])[-2000:]
    _check_frames(_video(server, good["outputs"]), _roundtrip(server, SIZE))
