"""Sharded training, proven where it can be on CPUs: accelerate runs FSDP only on GPUs, so the
trainer refuses it (training.train.sharding_problem); torch's own FSDP2 is checked here on the
look-back UNet (tests/fsdp_proof.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from lookback_core.weights import read_temporal_header

PROOF = Path(__file__).with_name("fsdp_proof.py")


def _run(setup: dict, out: Path, processes: int) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    result = subprocess.run(
        [*launcher, str(PROOF), "--checkpoint", str(setup["checkpoint"]), "--config_dir", str(setup["config_dir"]),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


def test_fsdp2_shards_by_site_trains_as_one_process_and_gathers_the_same_weights_file(
    setup, tmp_path
) -> None:
    single, sharded = _run(setup, tmp_path / "single", 1), _run(setup, tmp_path / "fsdp", 2)
    # the loss of each step over the global batch: the same up to the order of fp32 sums
    # (measured 1e-7 relative; a wrong gradient average or a process's lost half moves it by 1e-2)
    assert len(sharded["losses"]) == 3
    for one, two in zip(single["losses"], sharded["losses"], strict=True):
        assert abs(one - two) <= 1e-5 * abs(one), (single["losses"], sharded["losses"])
    # the wrapping policy: every site its own unit, its parameters split between the processes
    first, second = sharded["held"]
    assert set(first) == set(second) and len(first) == 21  # SD1.5's 21 sites
    assert all(first[site] > 0 and second[site] > 0 for site in first)
    single_file, sharded_file = (
        tmp_path / "single" / "weights.safetensors",
        tmp_path / "fsdp" / "weights.safetensors",
    )
    a, b = load_file(single_file), load_file(sharded_file)
    assert sorted(a) == sorted(b)
    in_file = {site: sum(t.numel() for k, t in a.items() if k.startswith(site + ".")) for site in first}
    assert in_file == {site: first[site] + second[site] for site in first}  # the two shards make each site
    # AdamW's first steps move a weight by about its rate whatever the gradient's size, so rounding
    # in a near-zero gradient may move it by up to one step (1e-3); measured 7e-5 at most
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    assert read_temporal_header(sharded_file).config == read_temporal_header(single_file).config
