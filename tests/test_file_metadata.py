"""Tampered files: embedded model configs and look-back weights metadata are checked when read, in one
place for every front end, with errors that name the file, the field and what was expected; nothing
built from a crafted file can raise in ``str()``/``repr()`` (issue 35 items 3 and 4)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lookback_core.checkpoint_file import CheckpointError, checkpoint_metadata
from lookback_core.config import LookBackConfig, preset
from lookback_core.ldm_export import save_ldm_checkpoint
from lookback_core.sd15 import EMBEDDED_CONFIGS_KEY, load_sd15
from lookback_core.temporal_unet import create_lookback_unet
from lookback_core.tiny import tiny_config_dir, tiny_sd15_models
from lookback_core.weights import (
    TemporalHeader,
    TemporalWeightsError,
    read_temporal_header,
    save_temporal_weights,
)

DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep: RecursionError in Python's json


@pytest.fixture
def weights(tiny_unet, tmp_path) -> Path:
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal)
    return save_temporal_weights(
        tmp_path / "crafted.safetensors", model, training={"latent_scale": 0.18215, "context_dim": 32}
    )


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _tamper(path: Path, key: str, value: str) -> None:
    save_file(load_file(path), path, metadata={**_metadata(path), key: value})


def _with_config(path: Path, **changes) -> None:
    _tamper(path, "config", json.dumps({**json.loads(_metadata(path)["config"]), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"depth": "3"}, "depth must be a whole number in 1..64, got '3'"),
        ({"depth": 0}, "depth must be a whole number in 1..64, got 0"),
        ({"depth": 10**9}, "depth must be a whole number in 1..64"),
        ({"kernel": 4}, "kernel must be an odd whole number in 1..15, got 4"),
        ({"kernel": 2.5}, "kernel must be an odd whole number"),
        ({"sites": "middle"}, "sites must be a list of site names"),
        ({"sites": [1, 2]}, "sites must be at most 256 site names"),
        ({"first_frame_anchor": "yes"}, "first_frame_anchor must be true or false, got 'yes'"),
        ({"adapter": 1}, "adapter must be true or false, got 1"),
        ({"padding_mode": ["zeros"]}, "padding_mode must be one of"),
        ({"channels": {"middle": "64"}}, "channels must map site names to a whole number in 1..16384"),
        ({"channels": []}, "channels must map site names"),
    ],
)
def test_wrong_typed_module_config_fields_are_named(weights, changes, message) -> None:
    _with_config(weights, **changes)
    with pytest.raises(
        TemporalWeightsError, match="crafted.safetensors': its config metadata is invalid"
    ) as err:
        read_temporal_header(weights)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ('{"latent_scale": "x"}', "training.latent_scale must be a number in (0, 1000]"),
        ('{"latent_scale": [1]}', "training.latent_scale must be a number in (0, 1000]"),
        ('{"latent_scale": null}', "training.latent_scale must be a number in (0, 1000]"),
        ('{"latent_scale": {"a": 1}}', "training.latent_scale must be"),
        ('{"latent_scale": Infinity}', "training.latent_scale must be a number in (0, 1000]"),
        ('{"latent_scale": NaN}', "training.latent_scale must be"),
        ('{"latent_scale": 0}', "training.latent_scale must be a number in (0, 1000]"),
        ('{"context_dim": "64"}', "training.context_dim must be a whole number in 1..8192"),
        ('{"context_dim": 64.0}', "training.context_dim must be a whole number"),
        ('{"base_checkpoint": 5}', "training.base_checkpoint must be a file name, got 5"),
    ],
)
def test_wrong_typed_training_facts_are_named(weights, facts, message) -> None:
    _tamper(weights, "training", facts)
    with pytest.raises(
        TemporalWeightsError, match="crafted.safetensors': its training metadata is invalid"
    ) as err:
        read_temporal_header(weights)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("key", ["config", "training", "recommended_sampler"])
def test_weights_metadata_nested_100000_deep_is_a_named_error(weights, key) -> None:
    _tamper(weights, key, DEEP)
    with pytest.raises(
        TemporalWeightsError, match=f"crafted.safetensors': its {key} metadata is invalid"
    ) as err:
        read_temporal_header(weights)
    assert "nested 100000 levels deep; at most 64 are read" in str(err.value)


def test_weights_description_and_base_check_never_raise_for_a_crafted_header(tiny_unet) -> None:
    """ComfyUI calls str() on every input of a failed node inside its own error handler; a raising
    repr there stops its prompt worker. A header read from a file is checked (above); one built any
    other way must still describe itself."""
    from lookback_core.weights import base_problems
    from nodes.native import LookBackWeights

    config = LookBackConfig(depth=2, kernel=1)
    for facts in ({"latent_scale": "x"}, {"latent_scale": [1]}, {"latent_scale": None}, {"context_dim": {"a": 1}},
                  {"latent_scale": float("inf"), "base_checkpoint": ["odd"]}, {"base_checkpoint": "x" * 10_000}):  # fmt: skip
        header = TemporalHeader(config, training=facts)
        weights = LookBackWeights(temporal=None, header=header, name="crafted.safetensors")
        for text in (repr(weights), str(weights)):
            assert text.startswith("LookBackWeights('crafted.safetensors', ") and len(text) < 400, text
        if set(facts) != {"base_checkpoint"}:  # a wrong-typed fact is named, never a TypeError
            problems = base_problems(header, latent_scale=0.18215, context_dim=768)
            assert problems and all(p.startswith("training.") for p in problems), problems
    good = TemporalHeader(
        config, training={"latent_scale": 0.18215, "context_dim": 768, "base_checkpoint": "b.ckpt"}
    )
    assert repr(LookBackWeights(None, good, "w.safetensors")) == (
        "LookBackWeights('w.safetensors', trained on b.ckpt, text context 768, latent scale 0.18215, 21 sites)"
    )


# --- checkpoints that carry their own configs -------------------------------------------------------


@pytest.fixture(scope="module")
def own_configs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("own")
    models = tiny_sd15_models(tiny_config_dir(root), seed=5)
    path = save_ldm_checkpoint(root / "own.safetensors", *models, embed_configs=True)
    configs = json.loads(checkpoint_metadata(path)[EMBEDDED_CONFIGS_KEY])
    configs["scheduler"] = json.loads(
        (Path(__file__).parents[1] / "lookback_core/configs/sd15/scheduler/scheduler_config.json").read_text()
    )
    return {"path": path, "state": load_file(path), "configs": configs}


def _crafted(own_configs, tmp_path, part: str, **changes) -> Path:
    configs = json.loads(json.dumps(own_configs["configs"]))
    configs[part].update(changes)
    path = tmp_path / "crafted.safetensors"
    save_file(own_configs["state"], path, metadata={EMBEDDED_CONFIGS_KEY: json.dumps(configs)})
    return path


# (part, field, value, what the error says); the huge counts would build millions of layers (or allocate
# 10^9 timesteps) if they were trusted
CRAFTED = [
    ("unet", "norm_num_groups", 0, "unet.norm_num_groups must be a whole number in 1..8192, got 0"),
    ("unet", "norm_num_groups", 7, "unet.norm_num_groups (7) must divide every block's channels [32, 64, 64, 64]"),
    ("unet", "norm_num_groups", None, "unet.norm_num_groups must be a whole number in 1..8192, got None"),
    ("unet", "attention_head_dim", 3, "unet.attention_head_dim (the heads, 3) must divide every block's channels"),
    ("unet", "attention_head_dim", 0, "unet.attention_head_dim must be a whole number in 1..8192, got 0"),
    ("unet", "num_attention_heads", 8, "unet.num_attention_heads must be null"),
    ("unet", "layers_per_block", "2", "unet.layers_per_block must be a whole number in 1..16, got '2'"),
    ("unet", "layers_per_block", 10**6, "unet.layers_per_block must be a whole number in 1..16, got 1000000"),
    ("unet", "transformer_layers_per_block", -1, "unet.transformer_layers_per_block must be a whole number in 1..16"),
    ("unet", "block_out_channels", [32, 64], "unet.down_block_types must be a list of 2 (one per block)"),
    ("unet", "block_out_channels", "32", "unet.block_out_channels must be a list of 1..8 whole numbers"),
    ("unet", "down_block_types", "DownBlock2D", "unet.down_block_types must be a list of 4 (one per block)"),
    ("unet", "in_channels", 3, "unet.in_channels (3) must be vae.latent_channels (4)"),
    ("unet", "act_fn", "tanh", "unet.act_fn must be one of"),
    ("vae", "scaling_factor", 0, "vae.scaling_factor must be a number in (0, 1000] (the latent scale), got 0"),
    ("vae", "scaling_factor", float("nan"), "vae.scaling_factor must be a number in (0, 1000]"),
    ("vae", "scaling_factor", "0.18", "vae.scaling_factor must be a number in (0, 1000]"),
    ("vae", "norm_num_groups", 3, "vae.norm_num_groups (3) must divide every block's channels [8, 8, 16, 16]"),
    ("vae", "layers_per_block", 10**6, "vae.layers_per_block must be a whole number in 1..16"),
    ("text_encoder", "num_hidden_layers", 10**7, "text_encoder.num_hidden_layers must be a whole number in 1..64"),
    ("text_encoder", "num_attention_heads", 3, "text_encoder.num_attention_heads (3) must divide text_encoder.hidden_size (32)"),
    ("text_encoder", "vocab_size", 100, "text_encoder.vocab_size must be a whole number in 49408..1000000"),
    ("text_encoder", "max_position_embeddings", 10, "text_encoder.max_position_embeddings must be a whole number in 77..4096"),
    ("text_encoder", "hidden_size", 4096, "the text_encoder config describes at least 337,956,864 weights, the file holds 1,"),
    ("text_encoder", "hidden_act", 5, "text_encoder.hidden_act must be one of transformers' activations"),
    ("scheduler", "num_train_timesteps", 10**9, "scheduler.num_train_timesteps must be a whole number in 1..10000"),
    ("scheduler", "num_train_timesteps", 0, "scheduler.num_train_timesteps must be a whole number in 1..10000"),
    ("scheduler", "beta_start", float("nan"), "scheduler.beta_start must be a number in (0, 1], got nan"),
    ("scheduler", "beta_end", float("inf"), "scheduler.beta_end must be a number in (0, 1], got inf"),
    ("scheduler", "beta_start", 0.5, "scheduler.beta_start (0.5) must be below scheduler.beta_end (0.012)"),
    ("scheduler", "prediction_type", "sample", "scheduler.prediction_type must be 'epsilon' or 'v_prediction'"),
    ("scheduler", "trained_betas", [0.1], "scheduler.trained_betas must be null or a list of 1000 numbers"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("part", "field", "value", "message"), CRAFTED, ids=[f"{c[0]}.{c[1]}={c[2]!r}"[:60] for c in CRAFTED]
)
def test_crafted_embedded_configs_are_named_before_anything_is_built(own_configs, tmp_path, part, field, value, message) -> None:  # fmt: skip
    from lookback_core.sd15 import ModelConfigs, read_model_configs
    from nodes.own_config_checkpoint import load_own_config_checkpoint

    path = _crafted(own_configs, tmp_path, part, **{field: value})
    # the command line's, the trainer's and the toy commands' loader; the header check before them; the
    # ComfyUI loader's (which refuses before ComfyUI's classes are imported, so no ComfyUI is needed here)
    readers = [
        lambda: load_sd15(path),
        lambda: read_model_configs(path),
        lambda: load_own_config_checkpoint(path),
    ]
    if (
        "describes at least" not in message
    ):  # the size estimate needs what the file holds; the fields need not
        readers.append(
            lambda: ModelConfigs.from_metadata(path, checkpoint_metadata(path)[EMBEDDED_CONFIGS_KEY])
        )
    for read in readers:
        with pytest.raises(CheckpointError) as err:
            read()
        text = str(err.value)
        assert text.startswith(f"{path}: its metadata 'lookback_sd15_configs' cannot be built: "), text
        assert message in text, text


def test_embedded_configs_nested_100000_deep_are_a_named_error(own_configs, tmp_path) -> None:
    path = tmp_path / "deep.safetensors"
    save_file(own_configs["state"], path, metadata={EMBEDDED_CONFIGS_KEY: DEEP})
    with pytest.raises(CheckpointError, match=r"deep.safetensors: its metadata 'lookback_sd15_configs' is JSON nested 100000 levels deep"):  # fmt: skip
        load_sd15(path)


def test_a_safetensors_header_nested_100000_deep_is_a_named_error(tmp_path) -> None:
    header = ('{"__metadata__": {"format": "pt"}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], '
              f'"odd": {DEEP}}}').encode()  # fmt: skip
    path = tmp_path / "deep_header.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"deep_header.safetensors: the safetensors header is corrupt .*nested 10000\d levels deep"):  # fmt: skip
        checkpoint_metadata(path)
    with pytest.raises(CheckpointError, match=r"nested 10000\d levels deep"):
        load_sd15(path)


def test_a_good_embedded_config_still_loads_and_the_estimate_is_a_lower_bound(own_configs) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lookback_core.metadata import model_config_problems, weight_lower_bounds
    from lookback_core.sd15 import SHIPPED_CONFIG_DIR
    from toyworld.model import TOY_CHECKPOINT

    assert load_sd15(own_configs["path"]).vae.config.scaling_factor == 0.18215
    shipped = {
        p: json.loads((SHIPPED_CONFIG_DIR / p / "config.json").read_text())
        for p in ("unet", "vae", "text_encoder")
    }
    shipped["scheduler"] = own_configs["configs"]["scheduler"]
    toy = json.loads(checkpoint_metadata(TOY_CHECKPOINT)[EMBEDDED_CONFIGS_KEY])
    for configs in (shipped, toy, own_configs["configs"]):
        assert model_config_problems(configs) == []
        bounds = weight_lower_bounds(configs)
        with torch.device("meta"):
            built = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                     "vae": AutoencoderKL.from_config(configs["vae"]),
                     "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))}  # fmt: skip
        for part, model in built.items():
            count = sum(p.numel() for p in model.parameters())
            assert 0.6 * count < bounds[part] <= count, (part, bounds[part], count)
