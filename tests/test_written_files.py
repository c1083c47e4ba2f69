"""What the project writes: one atomic path for every file (a full disk leaves earlier files as they
were, and is named), file modes as the umask says, stages resumed only from complete facts, and
output names that FFmpeg would read as protocols written as the files they name. And what it reads:
a folder or FIFO given as a file is named as one."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import train_args

from lookback_cli.main import main
from lookback_core import atomic
from lookback_core.video_io import read_metadata, read_video, write_video
from toyworld import build as toybuild
from toyworld import decoder as toydecoder
from toyworld.build import BASE_FIELDS, DECODER_FIELDS, StageTimer, ToyRecipe, check_reusable, prepare

REPO = Path(__file__).parents[1]


def _disk_fills_up(monkeypatch) -> list[Path]:
    """Path.write_text/write_bytes write half their data, then fail as a full disk does; returns the
    files they were asked to write."""
    asked = []
    real = {"write_text": Path.write_text, "write_bytes": Path.write_bytes}

    def half_then_full(self, data, *args, **kwargs):
        if not data:  # check_writable's empty probe file: there is room for nothing
            return real["write_bytes" if isinstance(data, bytes) else "write_text"](
                self, data, *args, **kwargs
            )
        asked.append(self)
        data = data.encode() if isinstance(data, str) else data
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    return asked


def test_a_full_disk_leaves_the_earlier_eval_report_whole_and_is_named(tmp_path, capsys, monkeypatch) -> None:
    report = tmp_path / "eval.json"
    earlier = json.dumps([{"complete": True, "clips": list(range(100))}], indent=2)
    report.write_text(earlier)
    asked = _disk_fills_up(monkeypatch)
    command = ["toyworld", "eval", "--clips", "1", "--steps", "1", "--frames", "2", "--workers", "1"]
    assert main([*command, "--json", str(report)]) == 2
    assert asked, "the report was not written with Path.write_text/write_bytes"
    assert report.read_text() == earlier
    err = capsys.readouterr().err
    assert f"{report}: no space left on the disk" in err and "GiB free" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_the_atomic_helpers_keep_an_earlier_file_on_a_full_disk(tmp_path, monkeypatch) -> None:
    from PIL import Image

    text, picture = tmp_path / "a.md", tmp_path / "b.png"
    text.write_text("earlier\n")
    Image.new("RGB", (4, 4), "red").save(picture)
    before = picture.read_bytes()
    _disk_fills_up(monkeypatch)
    with pytest.raises(OSError) as raised:
        atomic.write_text(text, "later " * 1000)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(text)
    assert text.read_text() == "earlier\n"

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG" * 100)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_image(picture, np.zeros((8, 8, 3), np.uint8))
    assert picture.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.png"]


# Calls that write a file, and the lines allowed to make them outside lookback_core/atomic.py: a
# write to the temporary path atomic_path yields (named ``partial``), and these, each for its reason.
_WRITES = re.compile(
    r"\.write_text\(|\.write_bytes\(|imwrite\(|torch\.save\(|save_file\(|\.save\(|json\.dump\(|"
    r"""open\([^)]*["'][wax]b?["']|\.open\(["'][wax]"""
)
_ALLOWED = {
    ("training/train.py", 'probe.write_bytes(b"")'): "a probe of a folder's permissions, removed at once",
    ("training/train.py", 'self.path.open("a")'): "the step log, appended line by line",
    ("toyworld/build.py", 'log.open("a")'): "a trainer's output, appended as it comes",
    ("training/checkpoints.py", "(tmp / STATE_FILE).write_text"): "inside a temporary folder renamed whole",
    ("training/checkpoints.py", "(tmp / COMPLETE_MARKER).write_text"): "the same folder's marker",
    ("lookback_core/video_io.py", "target.write_bytes(data)"): "target is atomic_path's temporary file",
}


def test_every_file_is_written_through_the_atomic_path() -> None:
    found = []
    for folder in ("lookback_core", "lookback_cli", "toyworld", "training", "nodes"):
        for source in sorted((REPO / folder).rglob("*.py")):
            name = source.relative_to(REPO).as_posix()
            if name == "lookback_core/atomic.py":
                continue
            for number, line in enumerate(source.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if not _WRITES.search(code) or re.search(r"\bpartial\b", code):
                    continue
                if not any(name == file and part in code for file, part in _ALLOWED):
                    found.append(f"{name}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask) -> None:
    previous = os.umask(umask)
    try:
        weights = atomic.save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        report = atomic.write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(previous)
    for path in (weights, report):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_replaced_file_keeps_its_mode(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    atomic.save_safetensors({"a": torch.zeros(2)}, path)
    path.chmod(0o640)
    atomic.save_safetensors({"a": torch.ones(2)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# ----------------------------------------------------------------------------------------------
# Resuming the toy build: a stage is trusted only with its complete facts


def _recipe() -> ToyRecipe:
    return ToyRecipe(train_clips=1, vae_steps=2, unet_steps=2, lookback_steps=2, eval_clips=1)


def _fake_base_stage(monkeypatch) -> list[list[str]]:
    """``toyworld.base_model`` replaced by writing its two files (model, then facts); returns the runs."""
    runs = []

    def run(command: list[str]) -> None:
        runs.append(command)
        folder = Path(command[command.index("--output_dir") + 1])
        atomic.save_safetensors({"w": torch.zeros(1)}, folder / "base.safetensors")
        facts = {name: getattr(_recipe(), name) for name in BASE_FIELDS} | {"seconds": 7}
        atomic.write_text(folder / "base_facts.json", json.dumps(facts))

    monkeypatch.setattr(toybuild, "_run", run)
    return runs


@pytest.mark.parametrize("facts", [None, "", '{"train_clips": 1, "vae_st', "[]", '{"train_clips": 1}'])
def test_a_base_model_without_complete_facts_is_trained_again(tmp_path, monkeypatch, facts) -> None:
    """A kill between base.safetensors and base_facts.json (or an older build's half-written facts)."""
    runs = _fake_base_stage(monkeypatch)
    base = tmp_path / "base"
    base.mkdir()
    (base / "base.safetensors").write_bytes(b"left by a killed build")
    if facts is not None:
        (base / "base_facts.json").write_text(facts)
    check_reusable(tmp_path, _recipe(), tmp_path / "lookback")  # incomplete facts: nothing to compare
    path, resumed = prepare(tmp_path, _recipe(), StageTimer())
    assert len(runs) == 1 and resumed == []
    assert json.loads((base / "base_facts.json").read_text())["seconds"] == 7
    # now complete: the next run keeps it
    assert prepare(tmp_path, _recipe(), StageTimer()) == (path, ["base"]) and len(runs) == 1


@pytest.mark.parametrize("facts", [None, '{"decoder_steps": 2', '{"decoder_steps": 2}'])
def test_a_decoder_without_complete_facts_is_tuned_again(tmp_path, monkeypatch, facts) -> None:
    fields = {name: getattr(_recipe(), name) for name in BASE_FIELDS + DECODER_FIELDS}
    tuned = []
    monkeypatch.setattr(toydecoder, "load_sd15", lambda path: SimpleNamespace(vae=torch.nn.Linear(1, 1)))
    monkeypatch.setattr(toydecoder, "tune_decoder", lambda *a: tuned.append(a) or {"vae_psnr_db": 30.0})
    folder = tmp_path / toybuild.DECODER
    folder.mkdir()
    (folder / toydecoder.VAE_FILE).write_bytes(b"left by a killed build")
    if facts is not None:
        (folder / toydecoder.FACTS_FILE).write_text(facts)
    check_reusable(tmp_path, _recipe(), tmp_path / "lookback")
    result = toydecoder.decoder_stage(folder, tmp_path / "checkpoint.safetensors", fields)
    assert (
        len(tuned) == 1
        and result["vae_psnr_db"] == 30.0
        and result["decoder_steps"] == fields["decoder_steps"]
    )
    assert toydecoder.decoder_stage(folder, tmp_path / "checkpoint.safetensors", fields) == result
    assert len(tuned) == 1


# ----------------------------------------------------------------------------------------------
# Output names FFmpeg would read as protocols


@pytest.mark.parametrize("name", ["cam:1/v.gif", "pipe:1/v.mp4", "file:sub/v.webp", "a:b.gif", "http:x.mp4"])
def test_output_names_ffmpeg_reads_as_protocols_are_written_as_files(tmp_path, monkeypatch, name) -> None:
    monkeypatch.chdir(tmp_path)
    frames = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
    written = write_video(frames, name, fps=4, metadata={"prompt": "{}"})
    assert (tmp_path / name).is_file() and written == Path(name)
    assert read_video(name).shape == (3, 16, 16, 3) and read_metadata(name) == {"prompt": "{}"}
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert made == [name]  # nothing stray (file:sub/... once made sub/.v.webp.*.part)


def test_ffmpeg_on_a_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch) -> None:
    import imageio_ffmpeg

    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.buffer.read()\n"
                    "print('av_interleaved_write_frame(): No space left on device', file=sys.stderr)\nsys.exit(1)\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    target = tmp_path / "out" / "v.mp4"
    with pytest.raises(OSError) as raised:
        write_video(np.zeros((2, 8, 8, 3), np.uint8), target)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert "no space left on the disk" in atomic.describe_os_error(raised.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_the_trainer_writes_its_validation_video_into_an_output_dir_named_like_a_protocol(
    setup, tmp_path, monkeypatch
) -> None:
    import imageio.v3 as iio
    from toy_clips import toy_frames

    from training.train import main as train_main

    image = tmp_path / "start.png"
    iio.imwrite(image, toy_frames(5, size=40)[0])
    monkeypatch.chdir(tmp_path)
    extra = ["--max_train_steps", "1", "--validation_image", str(image), "--validation_steps", "1",
             "--validation_frames", "2", "--validation_inference_steps", "1"]  # fmt: skip
    assert train_main(train_args(setup, "cam:1", *extra)) == 0
    assert (tmp_path / "cam:1" / "validation" / "step-0000001.mp4").is_file()


# ----------------------------------------------------------------------------------------------
# A folder or FIFO given where a file is read


def test_a_folder_or_fifo_given_as_a_file_is_named_as_one(tmp_path, capsys) -> None:
    from lookback_core.image_prep import load_image
    from lookback_core.video_io import VideoReadError
    from lookback_core.weights import TemporalWeightsError, read_temporal_header
    from training.args import parse_args

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never opened: reading it would wait for a writer
    assert atomic.file_problem(tmp_path) == "is a folder, expected a file"
    assert atomic.file_problem(fifo) == "is a FIFO (named pipe), expected a file"
    assert atomic.file_problem(tmp_path / "nowhere") == "no such file"
    with pytest.raises(TemporalWeightsError, match="is a FIFO"):
        read_temporal_header(fifo)
    with pytest.raises(FileNotFoundError, match="is a folder, expected a file"):
        load_image(tmp_path)
    with pytest.raises(VideoReadError, match="it is a FIFO"):
        read_video(fifo)
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model", str(fifo), "--train_data_dir", str(tmp_path), "--output_dir", "o"])
    assert f"--pretrained_model: {fifo} is a FIFO (named pipe), expected a file" in capsys.readouterr().err
