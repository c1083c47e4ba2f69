"""The trainer against careless or unlucky users: kills, restarts, damaged state, bad data and flags."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import assert_same_weights, train_args, wait_for_checkpoint
from safetensors.torch import load_file
from toy_clips import square_dataset, toy_frames, write_toy_videos

from lookback_core.weights import read_temporal_header
from training import checkpoints
from training.args import parse_args
from training.buckets import Bucket
from training.cache import checkpoint_fingerprint
from training.data import Sample, clip_key, collate, discover_samples
from training.train import main as train_main

REPO = Path(__file__).parents[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_after_a_kill_before_the_final_export_rewrites_the_weights(
    setup, tmp_path
) -> None:
    """The state a kill leaves between committing the last checkpoint and rewriting the deployable
    file: an older deployable file. Resuming must not exit 0 with it in place."""
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "4", "--checkpointing_steps", "2")) == 0
    final = _weights(out / "checkpoint-4" / checkpoints.WEIGHTS_NAME)
    shutil.copy(out / "checkpoint-2" / checkpoints.WEIGHTS_NAME, out / checkpoints.WEIGHTS_NAME)
    assert not _same(_weights(out / checkpoints.WEIGHTS_NAME), final)
    args = train_args(setup, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert _same(_weights(out / checkpoints.WEIGHTS_NAME), final)


def test_a_finished_run_resumed_in_mid_epoch_trains_no_further(setup, tmp_path) -> None:
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "3", "--checkpointing_steps", "3")  # 4 steps per epoch
    assert train_main(args) == 0
    final = _weights(out / checkpoints.WEIGHTS_NAME)
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-3"]
    assert _same(_weights(out / checkpoints.WEIGHTS_NAME), final)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_restart_without_resume_refuses_an_earlier_runs_folder(setup, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                      "--checkpoints_total_limit", "1")  # fmt: skip
    assert train_main(args) == 0
    before = _weights(out / checkpoints.WEIGHTS_NAME)
    assert train_main(args) == 2
    assert (
        "holds another run's checkpoints (checkpoint-2)" in caplog.text
        and "--overwrite_output_dir" in caplog.text
    )
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2"]
    assert _same(_weights(out / checkpoints.WEIGHTS_NAME), before)
    caplog.clear()
    assert train_main([*args, "--overwrite_output_dir", "--seed", "5"]) == 0
    assert "--overwrite_output_dir: removed" in caplog.text
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2"]
    assert not _same(_weights(out / checkpoints.WEIGHTS_NAME), before)  # a new run (another seed)


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_never_runs_pickled_code(setup, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema")
    assert train_main(args) == 0
    for folder in checkpoints.complete_checkpoints(out):
        assert not list(folder.glob("custom_checkpoint_*")), "the trainer's own state is not pickled"
        assert {"ema.safetensors", "rng_0.safetensors"} <= {p.name for p in folder.iterdir()}
    marker = tmp_path / "pwned"
    # a planted custom object (accelerate would unpickle it freely were one registered): the
    # folder is refused unread and the next older checkpoint resumes
    (out / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    more = train_args(setup, out, "--max_train_steps", "5", "--checkpointing_steps", "2", "--use_ema")
    assert train_main([*more, "--resume_from_checkpoint", "latest"]) == 0
    assert "skipped" in caplog.text and "checkpoint-4: it cannot be loaded" in caplog.text
    assert "checkpoint-2 at step 2" in caplog.text and not marker.exists()
    # a poisoned file accelerate does read (its global RNG states) goes through its restricted
    # unpickler: refused and never run; the trainer's own RNG is in safetensors, so resume goes on
    poisoned = list((out / "checkpoint-5").glob("random_states_*.pkl"))
    assert poisoned
    for rng_state in poisoned:
        rng_state.write_bytes(pickle.dumps(_Marker(marker)))
    caplog.clear()
    later = train_args(setup, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--use_ema")
    assert train_main([*later, "--resume_from_checkpoint", "latest"]) == 0
    assert "checkpoint-5 at step 5" in caplog.text and not marker.exists()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(setup, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "4", "--checkpointing_steps", "2")) == 0
    model = out / "checkpoint-4" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    args = train_args(setup, out, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert "skipped" in caplog.text and "checkpoint-4: it cannot be loaded" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    # every checkpoint damaged: a clear refusal, not a silent start from step 0
    for folder in checkpoints.complete_checkpoints(out):
        (folder / "rng_0.safetensors").write_bytes(b"garbage")
    caplog.clear()
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 2
    assert "none of the checkpoints" in caplog.text


def test_resuming_with_another_preset_names_both(setup, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "2")) == 0
    args = train_args(setup, out, "--max_train_steps", "3")
    args[args.index("--preset") + 1] = "paper"
    assert train_main([*args, "--resume_from_checkpoint", "latest"]) == 2
    assert (
        "d=3 k=3 at 21 sites, but this run asks for d=5 k=5 at 21 sites (--preset paper and the ablation flags)"
        in caplog.text
    )
    caplog.clear()
    # an ablation variant is another module config too
    causal = train_args(
        setup, out, "--max_train_steps", "3", "--causal_adapter", "--resume_from_checkpoint", "latest"
    )
    assert train_main(causal) == 2
    assert "asks for d=3 k=3 at 21 sites with a causal adapter" in caplog.text


def test_resuming_with_another_objective_or_timestep_bias_is_refused(setup, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "2")) == 0
    before = read_temporal_header(out / "lookback_weights.safetensors").training
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    assert train_main(train_args(setup, out, *resume, "--objective", "ddpm")) == 2
    assert "was trained with objective 'hybrid' (this run: 'ddpm')" in caplog.text
    caplog.clear()
    bias = ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2"]
    assert train_main(train_args(setup, out, *resume, *bias)) == 2
    assert "timestep_bias None (this run: {'strategy': 'later'" in caplog.text
    assert read_temporal_header(out / "lookback_weights.safetensors").training == before  # nothing changed
    assert train_main(train_args(setup, out, *resume)) == 0  # the same flags continue


def test_overwriting_a_run_never_deletes_an_input_it_needs(setup, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--max_train_steps", "1")) == 0
    weights = out / "lookback_weights.safetensors"
    again = train_args(setup, out, "--max_train_steps", "1", "--overwrite_output_dir",
                       "--init_lookback_weights", str(weights))  # fmt: skip
    again.remove("--preset"), again.remove("light")
    with pytest.raises(SystemExit):
        train_main(again)
    assert "--overwrite_output_dir would delete it" in capsys.readouterr().err
    assert weights.is_file() and checkpoints.complete_checkpoints(out)  # nothing was deleted
    # a copy outside the folder is fine: the run starts over from it
    kept = tmp_path / "kept.safetensors"
    shutil.copy(weights, kept)
    again[again.index(str(weights))] = str(kept)
    assert train_main(again) == 0 and weights.is_file()


def test_modules_too_large_to_train_are_refused_before_they_are_allocated(
    setup, tmp_path, caplog, monkeypatch
) -> None:
    import lookback_core.memory

    # the deepest modules the flags allow, on a machine with 1 MiB free (a depth beyond the
    # flags' bound is refused earlier, by the number rules)
    monkeypatch.setattr(lookback_core.memory, "host_available_bytes", lambda: 2**20)
    assert train_main(train_args(setup, tmp_path / "run", "--lookback_depth", "64")) == 2
    assert (
        "(d=64 k=3 at 21 sites): training" in caplog.text and "GiB of cpu memory is available" in caplog.text
    )
    assert "choose a smaller --lookback_depth" in caplog.text


def test_causal_adapter_without_an_adapter_is_refused(setup, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        train_main(train_args(setup, tmp_path / "run", "--causal_adapter", "--no_adapter"))
    assert "with --no_adapter there is none" in capsys.readouterr().err


def test_ablation_flags_shape_the_trained_modules(setup, tmp_path) -> None:
    out = tmp_path / "run"
    flags = ["--max_train_steps", "1", "--lookback_depth", "2", "--no_adapter", "--first_frame_anchor"]
    assert train_main(train_args(setup, out, *flags)) == 0
    config = read_temporal_header(out / "lookback_weights.safetensors").config
    assert (config.depth, config.kernel, config.lookback, config.adapter, config.first_frame_anchor) == (
        2,
        3,
        True,
        False,
        True,
    )
    assert parse_args(train_args(setup, out, "--no_lookback_conv", "--no_adapter"))  # the channel mix alone
    with pytest.raises(SystemExit):
        parse_args(train_args(setup, out, "--lookback_depth", "0"))


def test_the_latent_cache_is_keyed_on_the_encoders_and_the_caption(setup, tmp_path) -> None:
    """The cache's folder: the VAE's and text encoder's weights as the file holds them, and the dtype
    they encode in; a backbone trained on (another UNet in the same file) keeps the cache."""
    from safetensors.torch import save_file

    from lookback_core.checkpoint_file import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
    from lookback_core.tiny import write_tiny_sd15_checkpoint

    checkpoint, config_dir = setup["checkpoint"], setup["config_dir"]
    state = load_file(checkpoint)

    def fingerprint_changed(prefix: str) -> str:
        name = next(k for k in sorted(state) if k.startswith(prefix) and state[k].is_floating_point())
        changed = tmp_path / f"{prefix.split('.')[0]}.safetensors"
        save_file({**state, name: state[name] + 0.5}, changed)
        return checkpoint_fingerprint(changed, config_dir, torch.float32)

    same = checkpoint_fingerprint(checkpoint, config_dir, torch.float32)
    assert checkpoint_fingerprint(checkpoint, config_dir, torch.float32) == same
    assert fingerprint_changed(VAE_PREFIX) != same and fingerprint_changed(TEXT_PREFIX) != same
    assert fingerprint_changed(UNET_PREFIX) == same
    assert checkpoint_fingerprint(checkpoint, config_dir, torch.bfloat16) != same
    other = write_tiny_sd15_checkpoint(tmp_path / "other.safetensors", config_dir=config_dir, seed=9)
    assert checkpoint_fingerprint(other, config_dir, torch.float32) != same
    sample = Sample(Path("clip.mp4"))
    key = clip_key(sample, "a cat", 0, 2, Bucket(32, 32, 4))
    assert key != clip_key(sample, "a dog", 0, 2, Bucket(32, 32, 4))
    assert key != clip_key(sample, "a cat", 0, 2, Bucket(64, 64, 4))
    assert key != clip_key(sample, "a cat", 0, 2, Bucket(64, 32, 4))  # another aspect ratio
    assert key != clip_key(sample, "a cat", 0, 2, Bucket(32, 32, 8))  # another frame count


def test_bad_captions_are_skipped_and_any_image_mode_is_read(tmp_path) -> None:
    root = tmp_path / "data"
    write_toy_videos(root, 2, frames=10, size=40)
    (root / "clip_001.txt").write_bytes(b"caf\xe9 \xff not utf-8")
    for mode in ("L", "RGBA", "P", "I;16"):
        folder = root / f"frames_{mode.replace(';', '')}"
        folder.mkdir()
        from PIL import Image

        for i, frame in enumerate(toy_frames(4, frames=10, size=40)):
            image = Image.fromarray(frame)
            image = image.convert("L").convert(mode) if mode == "I;16" else image.convert(mode)
            image.save(folder / f"{i:04d}.png")
    samples = discover_samples(root)  # reading a caption never stops discovery
    dataset = square_dataset(root)
    batch = collate([dataset[i] for i in range(len(dataset))])
    reasons = {Path(p).name: r for p, r in batch["skipped"]}
    assert reasons == {"clip_001.mp4": "unreadable caption"}
    assert batch["pixels"].shape == (len(samples), 4, 3, 32, 32)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--frame_stride", "0", "--frame_stride must be >= 1"),
        ("--max_train_steps", "-1", "--max_train_steps must be >= 1"),
        ("--train_batch_size", "0", "--train_batch_size must be a whole number in 1..1024"),
        ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be >= 1"),
        ("--checkpointing_steps", "0", "--checkpointing_steps must be >= 1"),
        ("--learning_rate", "nan", "--learning_rate must be a number in (0, 1]"),
        ("--learning_rate", "0", "--learning_rate must be a number in (0, 1]"),
        ("--ema_decay", "1", "--ema_decay must be in (0, 1)"),
        ("--num_frames", "1", "--num_frames must be a whole number in 2..4096"),
        ("--validation_steps", "0", "--validation_steps must be >= 1"),
        ("--reference_fps", "0", "--reference_fps must be > 0"),
        ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be >= 1"),
        ("--train_text_encoder", None, "--train_text_encoder needs --train_backbone"),
        (
            "--text_encoder_learning_rate",
            "1e-4",
            "--text_encoder_learning_rate is the rate of --train_text_encoder",
        ),
    ],
)
def test_every_numeric_flag_and_flag_pairing_is_checked_up_front(
    setup, tmp_path, capsys, flag, value, message
) -> None:
    args = train_args(setup, tmp_path / "run", "--max_train_steps", "1")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag] if value is None else [flag, value]
    with pytest.raises(SystemExit) as exit_:
        train_main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _fails_before_step_1(setup, out: Path, caplog, *extra: str, data: Path | None = None) -> str:
    args = train_args(setup, out, "--max_train_steps", "2", *extra)
    if data is not None:
        args[args.index("--train_data_dir") + 1] = str(data)
    assert train_main(args) == 2
    assert not (out / "logs" / "metrics.jsonl").exists(), "the error came after training started"
    return caplog.text


def test_user_errors_are_named_before_step_1(setup, tmp_path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no videos" in _fails_before_step_1(setup, tmp_path / "a", caplog, data=empty)
    table = tmp_path / "bad.csv"
    table.write_text("id,title\n1,x\n")
    text = _fails_before_step_1(setup, tmp_path / "b", caplog, "--csv", str(table))
    assert "the CSV needs the columns videoid, name, page_dir" in text
    not_an_image = tmp_path / "start.png"
    not_an_image.write_bytes(b"no image here")
    text = _fails_before_step_1(setup, tmp_path / "c", caplog, "--validation_image", str(not_an_image))
    assert "--validation_image: cannot read image" in text
    no_model = tmp_path / "clip_model"
    no_model.mkdir()
    text = _fails_before_step_1(setup, tmp_path / "d", caplog, "--isim_clip_model", str(no_model))
    assert "--isim_clip_model" in text and "not a loadable CLIP vision model folder" in text


def test_a_read_only_output_folder_is_named(setup, tmp_path, caplog, monkeypatch) -> None:
    """(Simulated: this suite may run as root, who writes anywhere.)"""
    real = Path.write_bytes

    def read_only(self, data):
        if self.parent == tmp_path / "locked":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    text = _fails_before_step_1(setup, tmp_path / "locked", caplog)
    assert "cannot write there (Read-only file system)" in text and "writable --output_dir" in text


def test_a_full_disk_is_named_as_such(setup, tmp_path, caplog, monkeypatch) -> None:
    import training.saver as saver_module

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(saver_module, "save_temporal_weights", full)
    assert train_main(train_args(setup, tmp_path / "run", "--max_train_steps", "1")) == 2
    assert "no space left on the disk" in caplog.text and "GiB free" in caplog.text
    assert "--resume_from_checkpoint latest" in caplog.text


def test_leftover_temporary_files_are_removed_on_the_next_start(setup, tmp_path, caplog) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = dead.stdout.strip()
    (out / "logs").mkdir(parents=True)
    leftovers = [
        out / f".lookback_weights.safetensors.{pid}-00000000.part",
        cache / "ab" / f".x.safetensors.{pid}-1.part",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1024)
    assert train_main(train_args(setup, out, "--max_train_steps", "1", "--cache_dir", str(cache))) == 0
    assert not any(p.exists() for p in leftovers)
    assert "a file a stopped run was writing" in caplog.text
    assert not list(out.rglob("*.part")) and not list(cache.rglob("*.part"))


def test_grayscale_frames_and_a_bad_caption_do_not_stop_a_run(setup, tmp_path, caplog) -> None:
    data = tmp_path / "data"
    write_toy_videos(data, 3, frames=10, size=40)
    (data / "clip_002.txt").write_bytes(b"\xff\xfe\xfa")
    gray = data / "gray_clip"
    gray.mkdir()
    for i, frame in enumerate(toy_frames(5, frames=10, size=40)):
        iio.imwrite(gray / f"{i:04d}.png", np.asarray(frame).mean(-1).astype(np.uint8))
    args = train_args(setup, tmp_path / "run", "--max_train_steps", "3")
    args[args.index("--train_data_dir") + 1] = str(data)
    assert train_main(args) == 0
    assert "unreadable caption" in caplog.text


def test_cache_entries_are_never_reused_across_base_checkpoints(setup, tmp_path) -> None:
    from lookback_core.tiny import write_tiny_sd15_checkpoint

    cache = tmp_path / "cache"
    assert (
        train_main(train_args(setup, tmp_path / "a", "--max_train_steps", "1", "--cache_dir", str(cache)))
        == 0
    )
    other = write_tiny_sd15_checkpoint(tmp_path / "other.safetensors", config_dir=setup["config_dir"], seed=3)
    args = train_args(setup, tmp_path / "b", "--max_train_steps", "1", "--cache_dir", str(cache))
    args[args.index("--pretrained_model") + 1] = str(other)
    assert train_main(args) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def _launch(setup, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    """``accelerate launch`` with two processes on the CPU (gloo), as docs/training.md says to scale out."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "training" / "train.py"),
        *train_args(setup, out, "--max_train_steps", str(steps), "--checkpointing_steps", "2", *extra),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def test_two_processes_train_together_and_resume_after_a_kill(setup, tmp_path) -> None:
    steps = 6
    straight = _launch(setup, tmp_path / "straight", steps)
    log = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, log
    # both ranks stepped and saved their RNG; only rank 0 wrote each checkpoint and the weights
    assert log.count("INFO lookback.train: saved") == steps // 2, log
    for step in (2, 4, 6):
        names = {p.name for p in (tmp_path / "straight" / f"checkpoint-{step}").iterdir()}
        assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors", "COMPLETE"} <= names
    lines = (tmp_path / "straight" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))  # one writer
    facts = read_temporal_header(tmp_path / "straight" / checkpoints.WEIGHTS_NAME).training
    # docs/training.md: effective batch = train_batch_size x gradient_accumulation_steps x processes
    assert facts["processes"] == 2 and facts["effective_batch_size"] == 2 * 1 * 2 and facts["steps"] == steps

    out = tmp_path / "killed"
    run = _launch(setup, out, steps)
    wait_for_checkpoint(run, out, 2)
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both ranks
    run.wait()
    assert not (out / f"checkpoint-{steps}").exists(), "the kill came too late to test anything"
    resumed = _launch(setup, out, steps, "--resume_from_checkpoint", "latest")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert_same_weights(tmp_path / "straight" / checkpoints.WEIGHTS_NAME, out / checkpoints.WEIGHTS_NAME)


def test_an_fsdp_run_is_refused_before_it_writes_one_shard_as_the_weights() -> None:
    """Under FSDP each process holds a shard of every trained weight, and the weights file is written
    by the main process from the unwrapped model (docs/training.md#several-processes): refused, and
    the message names what to use instead. DDP and one process are not."""
    from accelerate.utils import DistributedType

    from training.train import sharding_problem

    problem = sharding_problem(DistributedType.FSDP)
    assert problem and "FSDP" in problem and "ddp.yaml" in problem
    for allowed in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert sharding_problem(allowed) is None
