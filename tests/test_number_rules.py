"""One table of sampler settings and number rules for every front end, and every number that could
exhaust memory or overflow checked before a model loads (issue 35 item 6, issue 36 item 7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image

from lookback_cli.main import build_parser, main

REPO = Path(__file__).parents[1]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions}


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_every_front_end_reads_the_one_table_of_sampler_settings() -> None:
    from lookback_core.rules import SAMPLER_SETTINGS
    from lookback_core.sampler import SETTING_RULES, SamplerSettings
    from lookback_core.weights import RECOMMENDABLE
    from nodes.native import LookBackApply

    defaults = SamplerSettings()
    assert {name: getattr(defaults, name) for name in SAMPLER_SETTINGS} == {
        name: s.default for name, s in SAMPLER_SETTINGS.items()
    }
    assert set(SETTING_RULES) == set(SAMPLER_SETTINGS) and set(RECOMMENDABLE) == set(SAMPLER_SETTINGS) - {
        "seed"
    }
    generate = _options(_subparser(build_parser(), "generate"))
    toy_eval = _options(_subparser(build_parser(), "toyworld", "eval"))
    for name, setting in SAMPLER_SETTINGS.items():
        flag = generate[name]
        assert flag.option_strings == [setting.flag] and setting.help in flag.help
        assert flag.default == (setting.default if name == "seed" else None)  # None: the weights' value
        assert flag.choices == (setting.choices or None)
        if name in ("steps", "cfg_scale", "eta", "colour_match"):  # the ones toyworld eval takes
            assert toy_eval[name].option_strings == [setting.flag] and toy_eval[name].default is None
            assert toy_eval[name].choices == flag.choices and toy_eval[name].type == flag.type
    choices, spec = LookBackApply.INPUT_TYPES()["optional"]["colour_match"]
    assert set(SAMPLER_SETTINGS["colour_match"].choices) < set(choices)
    assert SAMPLER_SETTINGS["colour_match"].help in spec["tooltip"]


def test_the_trainer_and_the_toy_recipe_bound_shared_quantities_by_the_shared_rules() -> None:
    from lookback_core.rules import NUMBERS
    from lookback_core.sampler import SETTING_RULES
    from toyworld.build import RECIPE_RULES
    from training.args import NUMBER_RULES

    shared = {
        "validation_frames": NUMBERS["frames_at_once"], "num_frames": NUMBERS["frames_at_once"],
        "learning_rate": NUMBERS["learning_rate"], "lookback_depth": NUMBERS["lookback_depth"],
        "timestep_bias_multiplier": NUMBERS["timestep_bias_multiplier"],
        "motion_loss_weight": NUMBERS["motion_loss_weight"], "seed": NUMBERS["training_seed"],
        "validation_inference_steps": SETTING_RULES["steps"], "validation_guidance_scale": SETTING_RULES["cfg_scale"],
    }  # fmt: skip
    assert {flag: NUMBER_RULES[flag] for flag in shared} == shared
    assert RECIPE_RULES["lookback_learning_rate"] == NUMBERS["learning_rate"]
    assert (
        RECIPE_RULES["seed"] == NUMBERS["training_seed"]
        and RECIPE_RULES["sampler_steps"] == SETTING_RULES["steps"]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--validation_frames", "100000"], "--validation_frames must be a whole number in 2..4096"),
        (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "1e39"], "--timestep_bias_multiplier must be a number in 1e-06..1e+06"),
        (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "1e-50", "--timestep_bias_portion", "1"],
         "--timestep_bias_multiplier must be a number in 1e-06..1e+06"),
        (["--motion_loss_weight", "1e39"], "--motion_loss_weight must be a number in 0..10000"),
        (["--lookback_depth", "100000"], "--lookback_depth must be a whole number in 1..64"),
        (["--validation_guidance_scale", "1e39"], "--validation_guidance_scale must be a number in 0..100"),
        (["--horizon_frames", "100000"], "--horizon_frames must be a whole number in 2..4096"),
    ],
)  # fmt: skip
def test_trainer_numbers_that_exhaust_memory_or_overflow_are_refused_with_the_flags(
    setup, tmp_path, capsys, flags, message
) -> None:
    from training.args import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(train_args(setup, tmp_path / "run", *flags))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_timestep_weights_that_overflow_or_vanish_in_float32_are_refused() -> None:
    from training.objective import timestep_weights

    assert torch.isfinite(timestep_weights(1000, "later", 1e6, 1.0)).all()
    for multiplier in (1e39, 1e-50):
        with pytest.raises(ValueError, match="infinite or all zero"):
            timestep_weights(1000, "later", multiplier, 1.0)


def test_a_validation_video_that_cannot_fit_is_refused_before_the_models_load(setup, tmp_path) -> None:
    from training.validation import check_validation_inputs

    image = tmp_path / "v.png"
    iio.imwrite(image, np.zeros((32, 32, 3), dtype=np.uint8))
    args = argparse.Namespace(
        validation_image=[str(image)], isim_clip_model=None, pretrained_model=str(setup["checkpoint"]),
        resolution=2048, dataset_config=None, validation_frames=4096, validation_guidance_scale=7.5,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--validation_frames 4096: the validation video \(4096 frames of 2048x2048"
    ):
        check_validation_inputs(args)
    check_validation_inputs(argparse.Namespace(**{**vars(args), "resolution": 32, "validation_frames": 16}))


def test_extend_video_refuses_frame_counts_that_cannot_be_allocated(monkeypatch) -> None:
    import lookback_core.memory as memory
    from nodes.native import LookBackExtendVideo, LookBackImageToVideo

    video = {"samples": torch.randn(6, 4, 8, 8)}
    for frames, context, message in ((10**9, 5, "frames must be a whole number in 1..4095"),
                                     (4095, 5, r"context_frames \+ frames must be a whole number in 2\.\.4096"),
                                     (0, 5, "frames must be a whole number in 1..4095")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            LookBackExtendVideo().extend(video, frames=frames, context_frames=context)
    inputs = LookBackExtendVideo.INPUT_TYPES()["required"]
    assert inputs["frames"][1]["max"] == 4095
    assert LookBackImageToVideo.INPUT_TYPES()["required"]["frames"][1]["max"] == 4096
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2**20)  # 1 MiB left
    with pytest.raises(
        ValueError, match=r"frames: a latent video of 4005 frames of 8x8 needs .* GiB of host memory"
    ):
        LookBackExtendVideo().extend(video, frames=4000, context_frames=5)


def _nan_tiff(path: Path) -> Path:
    pixels = np.full((64, 64), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(path)
    return path


def test_a_start_image_holding_nan_is_named_before_any_model_loads(
    tiny_files, tmp_path, capsys, monkeypatch
) -> None:
    import lookback_core.sd15 as sd15
    from lookback_core.image_prep import load_image

    image = _nan_tiff(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"cannot read image '.*float.tiff': 1 pixels are NaN or infinite"):
        load_image(image)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(sd15, "load_sd15", never)
    argv = ["generate", "--checkpoint", str(tiny_files["checkpoint"]), "--config-dir", str(tiny_files["config_dir"]),
            "--image", str(image), "--frames", "3", "--steps", "1", "--out", str(tmp_path / "v.gif")]  # fmt: skip
    assert main(argv) == 2
    assert "1 pixels are NaN or infinite" in capsys.readouterr().err


def test_image_to_video_names_a_start_image_holding_nan_before_encoding_it() -> None:
    from nodes.native import LookBackImageToVideo

    image = torch.full((1, 64, 64, 3), 0.5)
    image[0, 3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match="image: holds NaN or infinite pixel values"):
        LookBackImageToVideo().encode(None, image, 16)  # refused before the VAE is used


def test_nan_in_a_scheduler_config_is_named_before_any_model_loads(tmp_path, capsys, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    import lookback_core.sd15 as sd15
    from lookback_core.checkpoint_file import checkpoint_metadata
    from lookback_core.ldm_export import save_ldm_checkpoint
    from lookback_core.tiny import tiny_config_dir, tiny_sd15_models

    models = tiny_sd15_models(tiny_config_dir(tmp_path), seed=5)
    path = save_ldm_checkpoint(tmp_path / "own.safetensors", *models, embed_configs=True)
    configs = json.loads(checkpoint_metadata(path)[sd15.EMBEDDED_CONFIGS_KEY])
    scheduler = json.loads((REPO / "lookback_core/configs/sd15/scheduler/scheduler_config.json").read_text())
    configs["scheduler"] = {**scheduler, "beta_end": float("nan")}
    save_file(load_file(path), path, metadata={sd15.EMBEDDED_CONFIGS_KEY: json.dumps(configs)})
    image = tmp_path / "start.png"
    iio.imwrite(image, np.zeros((64, 64, 3), dtype=np.uint8))

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its scheduler config was checked")

    monkeypatch.setattr(sd15, "load_sd15", never)
    argv = [
        "generate",
        "--checkpoint",
        str(path),
        "--image",
        str(image),
        "--frames",
        "3",
        "--out",
        str(tmp_path / "v.gif"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "own.safetensors: its metadata 'lookback_sd15_configs' cannot be built: scheduler.beta_end must be"
        in err
    )


def test_cfg_scales_that_overflow_guidance_are_refused_everywhere(tiny_files, tmp_path, capsys) -> None:
    from lookback_core.sampler import InvalidSetting, SamplerSettings

    with pytest.raises(InvalidSetting, match="cfg_scale=1e\\+39 must be a number in 0..100"):
        SamplerSettings(cfg_scale=1e39)
    image = tmp_path / "start.png"
    iio.imwrite(image, np.zeros((64, 64, 3), dtype=np.uint8))
    argv = ["generate", "--checkpoint", str(tiny_files["checkpoint"]), "--config-dir", str(tiny_files["config_dir"]),
            "--image", str(image), "--frames", "3", "--cfg", "1e39", "--out", str(tmp_path / "v.gif")]  # fmt: skip
    assert main(argv) == 2 and "--cfg must be a number in 0..100" in capsys.readouterr().err
