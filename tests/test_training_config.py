"""A training run described by a TOML file (``--config``), and the trackers it reports to."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import train_args

from lookback_core.weights import read_temporal_header
from training import checkpoints
from training.args import parse_args
from training.run_config import RESOLVED_NAME
from training.train import main as train_main

REPO = Path(__file__).parents[1]
EXAMPLES = sorted((REPO / "training" / "configs").glob("*.toml"))


def _toml(setup: dict, out: Path) -> str:
    """``train_args``'s tiny run as a config file, with its settings in their groups."""
    return f"""
[model]
pretrained_model = "{setup["checkpoint"]}"
config_dir = "{setup["config_dir"]}"
preset = "light"

[data]
train_data_dir = "{setup["data"]}"
resolution = 32
num_frames = 4
frame_stride = 2

[optimisation]
train_batch_size = 2
gradient_accumulation_steps = 1
max_train_steps = 2
use_ema = true

[output]
output_dir = "{out}"
report_to = "none"
"""


def test_a_run_from_a_config_file_trains_records_its_settings_and_reruns_from_its_resolved_file(
    setup, tmp_path, caplog
) -> None:
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(_toml(setup, out))
    # the command line overrides the file
    assert train_main(["--config", str(config), "--learning_rate", "5e-4"]) == 0
    header = read_temporal_header(out / checkpoints.WEIGHTS_NAME)
    assert header.training["learning_rate"] == 5e-4 and header.training["ema"] is True
    settings = header.training["settings"]
    assert settings["preset"] == "light" and settings["resolution"] == 32 and settings["max_train_steps"] == 2
    # paths by name only: no folder of the user's travels in a shared weights file
    assert settings["pretrained_model"] == setup["checkpoint"].name and settings["output_dir"] == "run"
    # the resolved file is the run: file, command line and defaults
    resolved = out / RESOLVED_NAME
    again = vars(parse_args(["--config", str(resolved)]))
    flags = train_args(setup, out, "--max_train_steps", "2", "--use_ema", "--learning_rate", "5e-4")
    assert again == vars(parse_args(flags))
    assert again["learning_rate"] == 5e-4 and again["adam_beta2"] == 0.999  # a default, written out
    # resuming from it with another recorded fact is refused as with flags, both values named
    caplog.set_level(logging.ERROR)
    resume = ["--config", str(resolved), "--resume_from_checkpoint", "latest", "--objective", "ddpm"]
    assert train_main(resume) == 2
    assert "objective 'hybrid' (this run: 'ddpm')" in caplog.text


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "[optimisation]\nlearning_rat = 1e-4\n",
            "[optimisation] learning_rat is not a flag of the trainer (did you mean learning_rate?)",
        ),
        ("learning_rate = 'fast'\n", "learning_rate must be a number, got 'fast'"),
        ("max_train_steps = 2.5\n", "max_train_steps must be a whole number, got 2.5"),
        ("use_ema = 1\n", "use_ema must be true or false, got 1"),
        ("resolution = true\n", "resolution must be a whole number, got True"),
        ("preset = 'huge'\n", "preset must be one of light, light-decoder, paper, got 'huge'"),
        ("[data]\nlearning_rate = 1e-4\n", "learning_rate belongs in [optimisation], not [data]"),
        ("[optimizer]\nlearning_rate = 1e-4\n", "[optimizer] is not a group of the trainer's flags"),
        ("learning_rate = 1e-4\n[optimisation]\nlearning_rate = 2e-4\n", "learning_rate is set twice"),
        ("learning_rate = \n", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_is_named_with_its_key_before_anything_loads(tmp_path, capsys, text, said) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--config: {config}" in err and said in err, err


def test_config_flag_misuse_is_named(tmp_path, capsys) -> None:
    for argv, said in (
        (["--config", str(tmp_path / "missing.toml")], f"no such file: {tmp_path / 'missing.toml'}"),
        (["--config", str(tmp_path)], f"{tmp_path} is a folder"),
        (["--config", "a.toml", "--config=b.toml"], "--config is given 2 times"),
        (["--config"], "--config needs a TOML file"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert said in capsys.readouterr().err, argv


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_configs_are_valid_runs_of_their_presets(setup, tmp_path, example) -> None:
    """Every key of each shipped example is a flag of the right type; with the paths pointed at
    files that exist, each parses into a run of the preset it is named for."""
    args = parse_args(
        [
            "--config", str(example),
            "--pretrained_model", str(setup["checkpoint"]), "--config_dir", str(setup["config_dir"]),
            "--train_data_dir", str(setup["data"]), "--csv", str(_webvid_csv(tmp_path)),
            "--validation_image", str(_image(tmp_path)), "--output_dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert args.preset == example.stem and args.max_train_steps > 1000 and args.mixed_precision == "bf16"
    assert args.output_dir == str(tmp_path / "run")  # the command line won over the file's
    assert args.validation_image == [str(tmp_path / "start.png")]  # a repeatable flag's list too


def _webvid_csv(folder: Path) -> Path:
    path = folder / "webvid.csv"
    path.write_text("videoid,name,page_dir\n1,a caption,000001_000050\n")
    return path


def _image(folder: Path) -> Path:
    from PIL import Image

    path = folder / "start.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_there_is_an_example_config_per_preset() -> None:
    from lookback_core.config import PRESETS

    assert {p.stem for p in EXAMPLES} == set(PRESETS)


def test_wandb_offline_receives_the_losses_and_settings(setup, tmp_path, monkeypatch) -> None:
    """--report_to wandb through accelerate's tracker, offline (no network here): the run lands in
    <output_dir>/logs/wandb, and its record holds every step's loss and the run's settings."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = train_args(setup, out, "--max_train_steps", "2")
    args[args.index("--report_to") + 1] = "wandb"
    assert train_main(args) == 0
    (run,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    # offline, wandb keeps the run as protobuf records (which `wandb sync` uploads); their keys and
    # JSON values are stored as written, so each logged loss and setting is found in the bytes
    record = run.read_bytes()
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2
    for loss in losses:
        assert b"\x04loss\x82\x01" + bytes([len(json.dumps(loss))]) + json.dumps(loss).encode() in record, (
            loss
        )
    assert b'\x06preset\x82\x01\x07"light"' in record  # the config: --preset light


def test_wandb_asked_for_but_not_installed_is_named_up_front(setup, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec then finds nothing
    args = train_args(setup, tmp_path / "run")
    args[args.index("--report_to") + 1] = "wandb"
    with pytest.raises(SystemExit):
        parse_args(args)
    assert "--report_to wandb needs the wandb package, which is not installed: pip install wandb" in (
        capsys.readouterr().err
    )


def test_validation_pairs_from_a_config_list_and_their_pairing_checked(setup, tmp_path, capsys) -> None:
    first, second = _image(tmp_path), tmp_path / "second.png"
    first.rename(second)
    first = _image(tmp_path)
    config = tmp_path / "run.toml"
    base = ["--config", str(config), *train_args(setup, tmp_path / "run")]
    config.write_text(f'validation_image = ["{first}", "{second}"]\nvalidation_prompt = ["one", "two"]\n')
    args = parse_args(base)
    assert args.validation_image == [str(first), str(second)] and args.validation_prompt == ["one", "two"]
    config.write_text(f'validation_image = ["{first}", "{second}"]\nvalidation_prompt = "both"\n')
    assert parse_args(base).validation_prompt == ["both", "both"]  # one prompt: every image's
    config.write_text(f'validation_image = ["{first}", "{second}"]\n')
    assert parse_args(base).validation_prompt == ["", ""]
    for text, said in (
        (f'validation_image = ["{first}", "{second}"]\nvalidation_prompt = ["a", "b", "c"]\n',
         "2 --validation_image and 3 --validation_prompt: give one prompt per image"),
        ('validation_prompt = "alone"\n', "--validation_prompt is the prompt of a --validation_image"),
        (f'validation_image = ["{first}", 3]\n', "validation_image must be a string or a list of strings"),
        (f'validation_image = ["{first}", "{tmp_path / "gone.png"}"]\n', f"--validation_image: no such file: {tmp_path / 'gone.png'}"),
    ):  # fmt: skip
        config.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(base)
        assert said in capsys.readouterr().err, text
