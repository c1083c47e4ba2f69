"""The host has what the pack relies on: ComfyUI's patch points, wrappers and patcher methods.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout (run in the Python named by
``COMFYUI_PYTHON``, default: this one). The pack refuses to load into a ComfyUI that lacks any
of them (``nodes.host.check_host``), naming what is missing and the release it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
REPO = Path(__file__).parents[1]

PROBE = """
import json, sys
sys.path[:0] = [{repo!r}]
sys.path.append({comfyui!r})  # after the repo: our nodes package wins over ComfyUI's nodes.py
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_patcher
from nodes import host
found = {{"missing": host.missing_host_features()}}
del comfy.model_patcher.ModelPatcher.set_model_output_block_patch  # an older ComfyUI, as it were
try:
    host.check_host()
except RuntimeError as err:
    found["refusal"] = str(err)
print(json.dumps(found))
"""


def test_comfyui_has_every_patch_point_and_wrapper_the_pack_uses() -> None:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run(
        [python, "-c", PROBE.format(repo=str(REPO), comfyui=COMFYUI_PATH)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["missing"] == [], found
    refusal = found.get("refusal", "")
    assert (
        "needs ComfyUI 0.33.0 or newer" in refusal and "ModelPatcher.set_model_output_block_patch" in refusal
    )
