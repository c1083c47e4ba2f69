"""Training samples per second on this machine's cores: one trainer process using every core
against several single-threaded processes (``accelerate launch``, gloo), side by side in one run.

The product's trainer (``training/train.py`` with ``toyworld build``'s flags: the shipped toy
model, backbone trained, toy-world clips) trains for ``--steps`` steps in each configuration,
after an untimed run has filled the latent cache (as a build's is after its first epoch); the
step times are the median of its own step log. "the same batch split" keeps the learning of a
step (its ratio is what the processes would buy a build); "batch N each" doubles the batch.

    python benchmarks/toy_train_processes.py                 # 16 frames, batch 4, 30 steps
    python benchmarks/toy_train_processes.py --frames 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toyworld import world  # noqa: E402
from toyworld.build import step_durations  # noqa: E402
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS  # noqa: E402


def trainer_command(processes: int) -> list[str]:
    """``train.py`` in one process, or in several through ``accelerate launch`` (gloo on the CPU)."""
    script = str(REPO / "training" / "train.py")
    if processes == 1:
        return [sys.executable, script]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script,
    ]  # fmt: skip


def run(data: Path, out: Path, processes: int, batch: int, frames: int, steps: int) -> float:
    command = trainer_command(processes) + [
        "--pretrained_model", str(TOY_CHECKPOINT),
        "--init_lookback_weights", str(TOY_WEIGHTS),
        "--train_data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(data.parent / "cache"),
        "--train_backbone", "--resolution", str(world.SIZE), "--num_frames", str(frames),
        "--frame_stride", "1", "--train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(steps), "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // processes)  # the cores shared out, one share a process
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(
        command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return float(np.median(step_durations(out / "logs" / "metrics.jsonl")))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=world.FRAMES)
    parser.add_argument(
        "--batch", type=int, default=4, help="the batch of one step (one process's, or split)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not (
        2 <= args.frames <= world.FRAMES and args.steps >= 4 and args.processes >= 2 and args.batch >= 1
        and args.batch % args.processes == 0
    ):  # fmt: skip
        parser.error(f"--frames 2..{world.FRAMES}, --steps >= 4, --processes >= 2, --batch a multiple of it")
    with tempfile.TemporaryDirectory() as tmp:
        data = world.write_dataset(Path(tmp) / "data", range(64), progress=False)
        rows = [
            ("1 process, every core", 1, args.batch),
            (
                f"{args.processes} processes, the same batch split",
                args.processes,
                args.batch // args.processes,
            ),
            (f"{args.processes} processes, batch {args.batch} each", args.processes, args.batch),
        ]
        # untimed: fills the latent cache with every clip the timed runs read (the largest draws
        # the most), so no configuration pays for encoding that the others skip
        run(data, Path(tmp) / "warm-up", 1, args.processes * args.batch, args.frames, args.steps)
        results = []
        for i, (name, processes, batch) in enumerate(rows):
            seconds = run(data, Path(tmp) / f"run{i}", processes, batch, args.frames, args.steps)
            results.append((name, seconds, processes * batch / seconds))
    base = results[0][2]
    print(f"toy training, {args.frames} frames, {os.cpu_count()} cores, median of {args.steps} steps")
    print("| configuration | s a step | samples a second | vs 1 process |\n|---|---|---|---|")
    for name, seconds, rate in results:
        print(f"| {name} | {seconds:.3f} | {rate:.2f} | {rate / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"configuration": n, "step_s": s, "samples_per_s": r} for n, s, r in results], indent=2
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
