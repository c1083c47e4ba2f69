"""The native nodes inside ComfyUI's own sampling (KSampler's code path), on the shipped toy model.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout; the checks run in the Python named
by ``COMFYUI_PYTHON`` (default: this one), which needs ComfyUI's and this pack's requirements.
tests/comfyui_checks.py loads the toy through the pack's own-config loader into ComfyUI's own
classes, samples and reports what it measured; the assertions are here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("comfyui_checks")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run(
        [python, str(REPO / "tests" / "comfyui_checks.py"), str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def test_comfyuis_own_parts_of_the_toy_compute_what_the_diffusers_parts_do(results) -> None:
    parts = results["parts"]
    # float32 on both sides, the same operations in another order: measured 1e-7..1e-6 relative.
    # Other group counts in a GroupNorm (the trap ComfyUI's fixed 32 sets) differ by 1e-1 and more.
    assert parts["unet"] < 1e-5 and parts["clip"] < 1e-5, parts
    assert parts["vae_encode"] < 1e-5 and parts["vae_decode"] < 1e-5, parts
    assert parts["norm_groups"] == [32], parts
    # ComfyUI's latent format scales by the VAE's recorded factor, not SD1.5's 0.18215
    assert parts["latent_scale"] == pytest.approx(parts["vae_scaling_factor"]) and parts["latent_scale"] > 0.5


def test_native_ddim_gives_the_core_samplers_frames_on_the_trained_toy(results) -> None:
    core = results["core"]
    # Mathematically the same steps (DDIM with eta 0 is Euler in sigma space); what is left is
    # float32 rounding through the steps and ComfyUI's timestep from sigma (a float, not exactly
    # the integer DDIM uses): 1e-5 of the frames' magnitude bounds it (measured: see docs/comfyui.md).
    # The modules alone change the frames by far more, and so does re-noising frame 0.
    tolerance = 1e-5 * core["magnitude"]
    assert core["max_abs_diff"] < tolerance, core
    assert core["frames"] == 16 and core["steps"] == 25 and core["cfg"] == 3.0, core  # recommended settings
    assert core["colour_match"] == "first_frame", core  # ... colour match too, in both
    assert core["start_latent_diff"] < 1e-5, core  # the user's VAE through Look-Back Image To Video
    assert core["without_modules_diff"] > 20 * tolerance and core["renoised_frame0_diff"] > 20 * tolerance, (
        core
    )
    assert core["frame0_error"] < 1e-5 and core["unet_frame0_error"] < 1e-5, core
    assert core["calls"] == [[2, 4]]  # positive and negative in one call, 4 frames each


def test_the_same_seed_gives_the_same_frames_in_ksampler_and_generate(results) -> None:
    # `generate --seed 7` on the toy's start image and caption (the core's own VAE, CLIP and noise,
    # the weights' recommended settings) against KSampler seed 7 with ddim/ddim_uniform at those
    # settings: one noise convention (lookback_core.sampler). The same tolerance as above; what is
    # added is the parts' own rounding (VAE and CLIP, 1e-7..1e-6 relative).
    same = results["same_seed"]
    assert same["max_abs_diff"] < 1e-5 * same["magnitude"], same
    assert same["seed"] == 7 and same["frames"] == 16, same
    assert (same["steps"], same["cfg"], same["colour_match"]) == (25, 3.0, "first_frame"), same
    core = results["core"]
    # ... in the add-noise strategy too (KSampler's ddim re-noises a masked-off frame with the seed + 1
    # draw) and in a long video (chunk i with seed + i on Look-Back Extend Video's latent)
    assert core["noised_diff"] < 1e-5 * core["noised_magnitude"], core
    assert core["long_video_diff"] < 1e-5 * core["long_video_magnitude"], core
    assert core["long_video_frames"] == 6, core


@pytest.mark.parametrize(
    "name",
    ["euler/normal", "dpmpp_2m/karras", "uni_pc/normal", "euler_ancestral/karras", "ddim/ddim_uniform"],
)
def test_any_sampler_keeps_frame_zero_the_image_at_every_unet_call(results, name) -> None:
    run = results["samplers"][name]
    assert run["frame0_error"] < 1e-5 and run["finite"], run
    assert run["unet_frame0_error"] < 1e-5, run
    assert run["frames_moved"] > 0.01, run


def test_conditioning_shapes_fold_frames_per_chunk(results) -> None:
    runs = results["conditioning"]
    assert runs["cfg1"]["calls"] == [[1, 4]]  # cfg 1: no negative pass
    assert [3, 4] in runs["combined"]["calls"]  # two positives and the negative in one call
    for name in ("combined", "area", "strength"):
        assert runs[name]["differs_from_plain_prompt"] > 1e-3, name
    for name, run in runs.items():
        assert run["frame0_error"] < 1e-5 and run["unet_frame0_error"] < 1e-5, (name, run)


def test_a_long_video_chunk_continues_from_its_pinned_context(results) -> None:
    run = results["long_video"]
    assert run["context_error"] < 1e-5 and run["unet_context_error"] < 1e-5, run
    assert run["frames"] == 4 + 3 and run["calls"] == [[2, 5]]


def test_a_lora_reaches_the_unet_under_the_lookback_modules(results) -> None:
    assert results["lora"]["0.0"] == 0
    assert results["lora"]["1.0"] > 1e-3


def test_mismatched_weights_and_a_second_apply_are_refused_by_name(results) -> None:
    message = results["wrong_channels"]
    assert "does not fit the look-back weights lookback_wide.safetensors" in message
    assert "has 64 channels in this UNet but 128 in the weights" in message, message
    assert "already applied" in results["twice"]
    assert results["additional_models"] == ["TemporalModules"]
    # what ComfyUI prints of the weights in an error report is one line, not the module tree
    assert results["weights_repr"].startswith("LookBackWeights('lookback_toy.safetensors'")
    assert len(results["weights_repr"]) < 300


@pytest.mark.parametrize("method", ["latent2rgb", "taesd"])
def test_the_live_preview_shows_every_frame(results, method) -> None:
    previews = results["previews"]
    assert previews["taesd_decoder_name"] == "taesd_decoder"  # SD1.5's, so TAESD really decoded
    run = previews[method]
    frames, (h, w) = run["frames"], run["latent_size"]
    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    scale = 8 if method == "taesd" else 1  # TAESD decodes to pixels, latent2rgb a pixel per latent
    # every step: the host's preview of the first latent (the pinned frame), then the grid of all frames
    assert sorted(run["sizes"]) == ["1", "2", "3"], run["sizes"]
    for sizes in run["sizes"].values():
        assert sizes == [[w * scale, h * scale], [cols * w * scale, rows * h * scale]], sizes
    if method == "latent2rgb":  # the grid's cells are the frames, which moved away from the start
        picture = np.asarray(run["last"])
        cells = [picture[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(rows) for c in range(cols)]
        assert all(np.abs(cells[i] - cells[0]).mean() > 1 for i in range(1, frames)), "frames alike"
