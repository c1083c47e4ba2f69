"""The benchmark scripts still run against the current code and print their side-by-side ratios.

Smallest settings only (this checks the scripts, not the numbers): full SD1.5 site shapes at
64 px for the recurrence, two full-size UNet configs at 2 frames for the step benchmark.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_recurrence_benchmark_checks_every_variant_and_prints_speedups() -> None:
    out = _run("bench_recurrence.py", "--frames", "3", "--presets", "light", "--repeat", "1")
    for variant in ("literal loop", "shipped (per-source convs)", "window buffer views", "per sample"):
        assert len(re.findall(rf"^{re.escape(variant)}.*( ms x ?[\d.]+.*){{4}}$", out, re.M)) == 1, out
    assert re.search(r"all four sites\s+shipped x[\d.]+ vs literal", out), out
    assert re.search(r"^shipped \(per-source convs\)(\s+\d+ MiB){4}$", out, re.M), out
    assert out.count("Conv3d") == 4


def test_step_benchmark_compares_configs_in_fresh_processes() -> None:
    out = _run("bench_unet_step.py", "--configs", "base,light-decoder", "--frames", "2", "--repeat", "1")
    rows = dict(re.findall(r"^(base|light-decoder)\s+([\d.]+(?:\s+[\d.]+){4})$", out, re.M))
    assert set(rows) == {"base", "light-decoder"}, out
    base, light = (list(map(float, rows[k].split())) for k in ("base", "light-decoder"))
    assert base[2] == 1.0 and base[4] == 1.0  # ratios are to the base row
    assert light[0] > base[0] and light[3] > base[3]  # more parameters, more peak memory


def test_training_step_profile_groups_the_time_and_compares_the_anchor(tmp_path) -> None:
    report = tmp_path / "profile.json"
    out = _run("profile_toy_step.py", "--batch", "1", "--frames", "3", "--steps", "1", "--json", str(report))
    assert "| convolution backward |" in out and "| convolution forward |" in out, out
    shares = [int(s) for s in re.findall(r"^\| [a-z ,]+ \| (\d+)% \|", out, re.M)]
    assert len(shares) >= 5 and 95 <= sum(shares) <= 105, out  # every kind, adding up to the whole
    assert re.search(r"without the first-frame anchor \d+ ms, with it \d+ ms \([\d.]+x\)", out), out
    data = json.loads(report.read_text())
    assert data["batch"] == 1 and set(data["step_s"]) == {"no_anchor", "anchor"}


def test_cache_memory_benchmark_loads_less_without_the_encoders(tmp_path) -> None:
    from lookback_core.tiny import tiny_config_dir

    configs = tiny_config_dir(tmp_path / "configs")
    out = _run(
        "cache_memory.py", "--work", str(tmp_path), "--configs", str(configs), "--frames", "2", "--size", "32"
    )
    report = json.loads(out[: out.rindex("}") + 1])
    full, cached = report["modes"]["encoders loaded"], report["modes"]["from a complete cache"]
    assert full["loaded_mib"] > 0 and cached["loaded_mib"] > 0 and "encode_peak_mib" not in cached
    assert full["encode_peak_mib"] >= full["loaded_mib"]
    assert re.search(
        r"resident after loading: \d+ MiB with the encoders, \d+ without \(-?\d+ MiB saved\)", out
    ), out


def test_ablation_step_benchmark_builds_each_variant_as_its_flags_do() -> None:
    out = _run("ablation_steps.py", "--batch", "1", "--frames", "2", "--rounds", "1", "--threads", "1", "--variants",
               "look-back + adapter (paper)", "temporal attention (AnimateDiff-style)")  # fmt: skip
    rows = dict(re.findall(r"^\| (.+?) \| ([\d.]+) M \| \d+ \([\d.]+x\) \|$", out, re.M))
    assert set(rows) == {"look-back + adapter (paper)", "temporal attention (AnimateDiff-style)"}, out
    assert re.search(r"^\| look-back \+ adapter \(paper\) \| [\d.]+ M \| \d+ \(1\.00x\) \|$", out, re.M), out
    assert (
        rows["look-back + adapter (paper)"] != rows["temporal attention (AnimateDiff-style)"]
    )  # other modules
