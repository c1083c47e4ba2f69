"""Sharded training, proven where it can be on CPUs: accelerate runs FSDP only on GPUs, so the
trainer refuses it (training.train.sharding_problem); torch's own FSDP2 is checked here on the
look-back UNet (tests/fsdp_proof.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lookback_core.weights import read_temporal_header

PROOF = Path(__file__).with_name("fsdp_proof.py")


def _run(setup: dict, out: Path, processes: int, *more: str) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, str(PROOF), "--checkpoint", str(setup["checkpoint"]), "--config_dir", str(setup["config_dir"]),
         "--out", str(out), *more],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}


@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory) -> Path:
    """The sharded run, 3 steps unbroken: its folder (its run.json and weights file)."""
    out = tmp_path_factory.mktemp("fsdp")
    _run(setup, out, 2)
    return out


@pytest.mark.xdist_group("fsdp")  # one process runs the sharded run for both
def test_fsdp2_shards_by_site_trains_as_one_process_and_gathers_the_same_weights_file(
    setup, tmp_path, sharded
) -> None:
    single, run = _run(setup, tmp_path / "single", 1), json.loads((sharded / "run.json").read_text())
    # the loss of each step over the global batch: the same up to the order of fp32 sums
    # (measured 1e-7 relative; a wrong gradient average or a process's lost half moves it by 1e-2)
    assert len(run["losses"]) == 3
    for one, two in zip(single["losses"], run["losses"], strict=True):
        assert abs(one - two) <= 1e-5 * abs(one), (single["losses"], run["losses"])
    # the wrapping policy: every site its own unit, its parameters split between the processes
    first, second = run["held"]
    assert set(first) == set(second) and len(first) == 21  # SD1.5's 21 sites
    assert all(first[site] > 0 and second[site] > 0 for site in first)
    single_file, sharded_file = tmp_path / "single" / "weights.safetensors", sharded / "weights.safetensors"
    a, b = load_file(single_file), load_file(sharded_file)
    assert sorted(a) == sorted(b)
    in_file = {site: sum(t.numel() for k, t in a.items() if k.startswith(site + ".")) for site in first}
    assert in_file == {site: first[site] + second[site] for site in first}  # the two shards make each site
    # AdamW's first steps move a weight by about its rate whatever the gradient's size, so rounding
    # in a near-zero gradient may move it by up to one step (1e-3); measured 7e-5 at most
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    assert read_temporal_header(sharded_file).config == read_temporal_header(single_file).config


@pytest.mark.xdist_group("fsdp")  # one process runs the sharded run for both
def test_a_sharded_run_stopped_and_resumed_from_its_shards_ends_as_the_unbroken_one(
    setup, tmp_path, sharded
) -> None:
    """Each process saves its part of every trained weight and of the AdamW state after step 2
    (tests/fsdp_proof.py's ``--stop_after``); a new sharded run loads them and trains step 3."""
    unbroken = json.loads((sharded / "run.json").read_text())
    _run(setup, tmp_path / "stopped", 2, "--stop_after", "2")
    assert not (tmp_path / "stopped" / "weights.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "stopped").glob("shard-*")) == [
        "shard-0.safetensors",
        "shard-1.safetensors",
    ]
    resumed = _run(setup, tmp_path / "resumed", 2, "--resume", str(tmp_path / "stopped"))
    assert resumed["losses"] == unbroken["losses"]
    a = load_file(sharded / "weights.safetensors")
    b = load_file(tmp_path / "resumed" / "weights.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
