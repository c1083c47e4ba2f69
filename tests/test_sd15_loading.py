"""SD1.5 single-file checkpoints: exact round trips, refusals by name, offline loading, configs."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from ldm_checkpoint import (
    fake_sd2_state_dict,
    fake_sdxl_state_dict,
    tiny_config_dir,
    tiny_sd15_models,
    unet_to_ldm,
    vae_to_ldm,
    write_tiny_sd15_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lookback_core.checkpoint_file import CheckpointError, detect_family
from lookback_core.ldm_export import replace_unet, replace_vae, save_ldm_checkpoint
from lookback_core.prompts import encode_long_prompt, encode_prompt, match_token_lengths
from lookback_core.sd15 import (
    EMBEDDED_CONFIGS_KEY,
    SHIPPED_CONFIG_DIR,
    SD15Components,
    embedded_configs_metadata,
    load_sd15,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd15")
    config_dir = tiny_config_dir(root)
    return {
        "config_dir": config_dir,
        "safetensors": write_tiny_sd15_checkpoint(root / "tiny.safetensors", config_dir=config_dir, seed=4),
        "ckpt": write_tiny_sd15_checkpoint(root / "tiny.ckpt", config_dir=config_dir, seed=4),
    }


@pytest.fixture(scope="module")
def loaded(files) -> SD15Components:
    return load_sd15(files["safetensors"], config_dir=files["config_dir"])


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_round_trip_is_exact(files, fmt) -> None:
    components = load_sd15(files[fmt], config_dir=files["config_dir"])
    originals = tiny_sd15_models(files["config_dir"], seed=4)
    for model, original in zip((components.unet, components.vae, components.text_encoder), originals):
        got, want = model.state_dict(), original.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), key
        assert not any(p.is_meta or p.dtype != torch.float32 for p in model.parameters())
        assert not model.training
    assert components.family == "sd15" and components.path == files[fmt]
    assert components.scheduler_config["beta_schedule"] == "scaled_linear"
    assert detect_family(torch.load(files["ckpt"], weights_only=True)["state_dict"]) == "sd15"


def test_loaded_models_run(loaded) -> None:
    sample = torch.randn(1, 4, 8, 8)
    context = encode_prompt(loaded.tokenizer, loaded.text_encoder, ["a photo of a cat"], "cpu")
    with torch.no_grad():
        assert loaded.unet(sample, 10, encoder_hidden_states=context).sample.shape == sample.shape
        image = loaded.vae.decode(sample).sample
    assert image.shape == (1, 3, 64, 64)  # the real 8x factor


@pytest.mark.parametrize(
    ("make", "family", "name"),
    [
        (fake_sdxl_state_dict, "sdxl", "an SDXL checkpoint"),
        (fake_sd2_state_dict, "sd2", "an SD2.x checkpoint"),
    ],
)
def test_other_families_refused_by_name(tmp_path, make, family, name) -> None:
    state = make()
    assert detect_family(state) == family
    assert detect_family({k: tuple(v.shape) for k, v in state.items()}) == family
    for path in (tmp_path / f"{family}_model.safetensors", tmp_path / f"{family}_model.ckpt"):
        if path.suffix == ".ckpt":
            torch.save({"state_dict": state}, path)
        else:
            save_file(state, path)
        with pytest.raises(CheckpointError, match=f"{path.name} is {name}; this node pack needs an SD1.5"):
            load_sd15(path)


def test_family_detection_beyond_sd() -> None:
    assert (
        detect_family(
            {"double_blocks.0.img_attn.qkv.weight": (9, 3), "single_blocks.0.linear1.weight": (9, 3)}
        )
        == "flux"
    )
    assert detect_family({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (9, 3)}) == "sd3"
    assert (
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}) == "lora"
    )
    assert detect_family({"down_blocks.0.resnets.0.conv1.weight": (3, 3)}) == "diffusers"
    assert (
        detect_family(
            {"encoder.down.0.block.0.conv1.weight": (3,), "decoder.up.0.block.0.conv1.weight": (3,)}
        )
        == "vae"
    )
    assert detect_family({"something.else": (1,)}) == "unknown"


def test_incomplete_checkpoint_names_the_missing_part(files, tmp_path) -> None:
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    path = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, path)
    with pytest.raises(
        CheckpointError, match=r"no_vae\.safetensors .*no VAE \(first_stage_model\.\*\) weights"
    ):
        load_sd15(path, config_dir=files["config_dir"])


@pytest.mark.parametrize("cut", ["header", "data", "garbage"])
def test_corrupt_safetensors_named(files, tmp_path, cut) -> None:
    data = files["safetensors"].read_bytes()
    path = tmp_path / f"broken_{cut}.safetensors"
    path.write_bytes({"header": data[:100], "data": data[: len(data) // 2], "garbage": b"\x00\xff" * 64}[cut])
    with pytest.raises(CheckpointError, match=f"broken_{cut}.safetensors"):
        load_sd15(path, config_dir=files["config_dir"])


def test_corrupt_or_unsafe_ckpt_named(files, tmp_path) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(CheckpointError, match="junk.ckpt: not a readable PyTorch checkpoint"):
        load_sd15(junk, config_dir=files["config_dir"])
    unsafe = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1)}, unsafe)
    with pytest.raises(
        CheckpointError, match=r"pickled.ckpt: holds Python objects .*argparse.Namespace.*weights_only"
    ):
        load_sd15(unsafe, config_dir=files["config_dir"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-ckpt",))


@pytest.mark.parametrize("kind", ["runs_code", "random_bytes", "plain_pickle"])
def test_unsafe_or_damaged_ckpt_refusals_never_pass_on_torchs_advice(
    files, tmp_path, monkeypatch, kind
) -> None:
    """torch's message advises weights_only=False (running the file's code); ours must not."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{kind}.ckpt"
    if kind == "runs_code":
        torch.save({"state_dict": {"x": _RunsCode()}}, path)
    elif kind == "random_bytes":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.write_bytes(pickle.dumps({"state_dict": {"x": 1}}, protocol=4)[:-2] + b"zz")
    with pytest.raises(CheckpointError) as caught:
        load_sd15(path, config_dir=files["config_dir"])
    message = str(caught.value)
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert message.startswith(f"{path}: ")
    if kind == "runs_code":
        assert "pickles posix.system" in message or "pickles os.system" in message
    else:
        assert "not a readable PyTorch checkpoint" in message
    assert not (tmp_path / "pwned-by-ckpt").exists()


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such checkpoint file"):
        load_sd15(tmp_path / "nowhere.safetensors")


def _mismatched_config(root: Path, part: str, **changes) -> Path:
    config_dir = tiny_config_dir(root)
    config_file = config_dir / part / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return config_dir


@pytest.mark.parametrize(
    ("part", "changes", "message"),
    [
        (
            "unet",
            {"block_out_channels": [16, 32, 32, 32]},
            r"32 output and 4 input channels; .* block_out_channels\[0\]=16",
        ),
        (
            "unet",
            {"cross_attention_dim": 48},
            r"context dim is \[32\] in the file; .* cross_attention_dim=48",
        ),
        ("unet", {"layers_per_block": 1}, r"UNet2DConditionModel does not match .*weights"),
        (
            "vae",
            {"block_out_channels": [8, 8, 16, 32]},
            r"AutoencoderKL does not match .* is \[16, .*the config expects \[32",
        ),
        (
            "text_encoder",
            {"intermediate_size": 48},
            r"CLIP text encoder does not match .*mlp\.fc1\.weight is \[64, 32\]",
        ),
    ],
)
def test_config_mismatch_is_named(files, tmp_path, part, changes, message) -> None:
    config_dir = _mismatched_config(tmp_path, part, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        load_sd15(files["safetensors"], config_dir=config_dir)
    assert "tiny.safetensors" in str(err.value) and f"{part}/config.json" in str(err.value)


def test_tokenizer_ids_and_prompt_encoding(loaded) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_CONFIG_DIR / "tokenizer", local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    embeddings = encode_prompt(
        loaded.tokenizer, loaded.text_encoder, ["a photo of a cat", "word " * 200], "cpu"
    )
    assert embeddings.shape == (2, 77, 32) and embeddings.dtype == torch.float32
    # Padding never changes the tokens before it: the causal text encoder sees the same prefix.
    alone = encode_prompt(loaded.tokenizer, loaded.text_encoder, ["a photo of a cat"], "cpu")
    assert torch.allclose(alone[0], embeddings[0])


def test_long_prompts_are_encoded_whole_in_windows_of_75_tokens(loaded) -> None:
    short, count = encode_long_prompt(loaded.tokenizer, loaded.text_encoder, "a photo of a cat", "cpu")
    assert count == 5
    torch.testing.assert_close(
        short, encode_prompt(loaded.tokenizer, loaded.text_encoder, ["a photo of a cat"], "cpu")
    )
    words = " ".join(f"cat{i}" for i in range(60))  # well over 75 tokens
    long, count = encode_long_prompt(loaded.tokenizer, loaded.text_encoder, words, "cpu")
    assert count > 75 and long.shape == (1, 77 * -(-count // 75), 32)
    ids = loaded.tokenizer(words, add_special_tokens=False).input_ids
    tail = loaded.tokenizer.decode(ids[75:150])
    # the second window is the encoding of the tokens after the first 75, on their own
    second = encode_prompt(loaded.tokenizer, loaded.text_encoder, [tail], "cpu")
    assert loaded.tokenizer(tail, add_special_tokens=False).input_ids == ids[75:150]
    torch.testing.assert_close(long[:, 77:154], second)
    a, b = match_token_lengths(long, short)
    assert a.shape == b.shape and torch.equal(b[:, 77:154], short)


@pytest.mark.parametrize("damage", ["nan", "inf", "integer"])
def test_damaged_weight_values_are_refused_at_load(files, tmp_path, damage) -> None:
    state = load_file(files["safetensors"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    if damage == "integer":
        state[key] = state[key].to(torch.int16)
    else:
        state[key] = state[key].clone()
        state[key].view(-1)[3] = float(damage)
    path = tmp_path / f"{damage}.safetensors"
    save_file(state, path)
    message = "not floating point" if damage == "integer" else "hold NaN or infinite values"
    with pytest.raises(CheckpointError, match=f"{path.name}: 1 (model )?weights? .*{message}.*{key}"):
        load_sd15(path, config_dir=files["config_dir"])


def test_loads_with_no_network(files, monkeypatch) -> None:
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # local_files_only is what keeps the hub away, not the environment: switch offline mode off.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    components = load_sd15(files["ckpt"], config_dir=files["config_dir"])
    encode_prompt(components.tokenizer, components.text_encoder, ["offline"], "cpu")
    assert attempts == []


def test_shipped_configs_are_sd15() -> None:
    """The shipped configs build SD1.5's published parameter counts; the LDM key layout fits them."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SHIPPED_CONFIG_DIR, subfolder="unet", local_files_only=True)
        )
        vae = AutoencoderKL.from_config(
            AutoencoderKL.load_config(SHIPPED_CONFIG_DIR, subfolder="vae", local_files_only=True)
        )
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SHIPPED_CONFIG_DIR / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    # The test helper's diffusers->LDM renaming, undone by diffusers' converter, at full size.
    ldm_unet = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 2).items()}
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm_unet  # 1st up block: no attention
    assert convert_ldm_unet_checkpoint(ldm_unet, unet.config).keys() == unet.state_dict().keys()
    ldm_vae = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 4).items()}
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert convert_ldm_vae_checkpoint(ldm_vae, vae.config).keys() == vae.state_dict().keys()
    scheduler = json.loads((SHIPPED_CONFIG_DIR / "scheduler/scheduler_config.json").read_text())
    assert scheduler | {"beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1} == scheduler


def test_checkpoint_with_embedded_configs_loads_with_no_config_folder(files, tmp_path) -> None:
    """An SD1.5 architecture at other sizes (the toy model) carries its configs in its metadata."""
    models = tiny_sd15_models(files["config_dir"], seed=5)
    path = save_ldm_checkpoint(tmp_path / "own_configs.safetensors", *models, embed_configs=True)
    with safe_open(path, framework="pt") as f:
        assert set(json.loads(f.metadata()[EMBEDDED_CONFIGS_KEY])) == {"unet", "vae", "text_encoder"}
    assert load_sd15(path).scheduler_config["prediction_type"] == "epsilon"  # SD1.5's, by default
    scheduler = {**json.loads((SHIPPED_CONFIG_DIR / "scheduler/scheduler_config.json").read_text())}
    scheduler["prediction_type"] = "v_prediction"
    path = save_ldm_checkpoint(path, *models, embed_configs=True, scheduler_config=scheduler)
    components = load_sd15(path)
    assert components.scheduler_config == scheduler  # the schedule the UNet was trained with travels too
    for model, original in zip((components.unet, components.vae, components.text_encoder), models):
        got, want = model.state_dict(), original.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = components.tokenizer(["a red square moving left"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(components.text_encoder(ids)[0], models[2](ids)[0])
    # Without the metadata the same file is checked against the shipped (full-size) configs.
    plain = save_ldm_checkpoint(tmp_path / "plain.safetensors", *models)
    with pytest.raises(CheckpointError, match=r"plain.safetensors.*configs/sd15/unet/config.json"):
        load_sd15(plain)


def test_embedded_configs_keep_values_set_after_construction(files, tmp_path) -> None:
    """A VAE scaling factor set with register_to_config (as the toy base does) survives the round trip.

    diffusers lists fields built with their defaults in ``_use_default_values`` and from_config drops
    their values: a checkpoint written with that note, as the first toy was, loaded at 0.18215."""
    unet, vae, text = tiny_sd15_models(files["config_dir"], seed=5)
    vae.register_to_config(scaling_factor=0.779, shift_factor=None)
    unet.register_to_config(norm_eps=1e-6)
    written = save_ldm_checkpoint(tmp_path / "set_later.safetensors", unet, vae, text, embed_configs=True)
    with safe_open(written, framework="pt") as f:
        configs = json.loads(f.metadata()[EMBEDDED_CONFIGS_KEY])
    assert all("_use_default_values" not in configs[part] for part in configs)
    # A file written with the note (the first toy checkpoint) keeps its recorded values too.
    noted = {**configs, "vae": {**configs["vae"], "_use_default_values": ["scaling_factor", "force_upcast"]}}
    noted["unet"] = {**configs["unet"], "_use_default_values": ["norm_eps"]}
    old = tmp_path / "with_note.safetensors"
    save_file(load_file(written), old, metadata={EMBEDDED_CONFIGS_KEY: json.dumps(noted)})
    for path in (written, old):
        components = load_sd15(path)
        assert components.vae.config.scaling_factor == 0.779
        assert components.unet.config.norm_eps == 1e-6
        assert components.unet.conv_norm_out.eps == 1e-6  # the value reaches the built model


def test_embedded_configs_that_do_not_fit_are_named(files, tmp_path) -> None:
    models = tiny_sd15_models(files["config_dir"], seed=5)
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    metadata = embedded_configs_metadata(*models)
    configs = json.loads(metadata[EMBEDDED_CONFIGS_KEY])
    configs["text_encoder"]["intermediate_size"] = 48  # the file's MLPs are 64 wide
    bad = tmp_path / "lying.safetensors"
    save_file(state, bad, metadata={EMBEDDED_CONFIGS_KEY: json.dumps(configs)})
    with pytest.raises(
        CheckpointError,
        match=r"lying.safetensors: the CLIP text encoder does not match the text_encoder config in lying",
    ):
        load_sd15(bad)
    configs["text_encoder"]["hidden_size"] = 4096  # would be a 200M-parameter embedding if allocated
    save_file(state, bad, metadata={EMBEDDED_CONFIGS_KEY: json.dumps(configs)})
    with pytest.raises(
        CheckpointError,
        match=r"lying.safetensors: its metadata 'lookback_sd15_configs' cannot be built: the text_encoder config "
        r"describes at least [\d,]+ weights, the file holds 1,600,749 for it",
    ):
        load_sd15(bad)
    junk = tmp_path / "junk_meta.safetensors"
    save_file(state, junk, metadata={EMBEDDED_CONFIGS_KEY: '{"unet": {}}'})
    with pytest.raises(
        CheckpointError, match="junk_meta.safetensors: its metadata 'lookback_sd15_configs' is not"
    ):
        load_sd15(junk)


@pytest.mark.parametrize(("part", "prefix"), [(0, "model.diffusion_model."), (1, "first_stage_model.")])
def test_replacing_the_unet_or_vae_keeps_everything_else(files, tmp_path, part, prefix) -> None:
    models = tiny_sd15_models(files["config_dir"], seed=5)
    source = save_ldm_checkpoint(
        tmp_path / "src.safetensors", *models, embed_configs=True, dtype=torch.float16
    )
    trained = tiny_sd15_models(files["config_dir"], seed=6)[part]
    out = (replace_unet, replace_vae)[part](source, trained, tmp_path / "out.safetensors")
    before, after = load_file(source), load_file(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(prefix))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
    components = load_sd15(out)  # the embedded configs came along
    loaded = (components.unet, components.vae)[part].state_dict()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded[key], value.half().float())
    assert {v.dtype for k, v in after.items() if k.startswith(prefix)} == {torch.float16}


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_loading_without_the_encoders_leaves_them_out_and_the_rest_as_loaded(files, loaded, fmt) -> None:
    """What a run from a complete latent cache loads: no VAE encoder, no text encoder; the UNet and
    the VAE's decoder as a full load has them."""
    parts = load_sd15(files[fmt], config_dir=files["config_dir"], vae_encoder=False, text_encoder=False)
    assert parts.text_encoder is None and parts.vae.encoder is None and parts.vae.quant_conv is None
    assert not any(p.is_meta for p in [*parts.unet.parameters(), *parts.vae.parameters()])
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(parts.vae.decode(latent).sample, loaded.vae.decode(latent).sample)
    state, full = parts.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(state[k], full[k]) for k in full)
