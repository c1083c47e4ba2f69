"""Temporal weights files: round trip, metadata, and named errors for every kind of bad file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PEAK_RSS_EXPRESSION, TINY_UNET_CONFIG, make_tiny_unet, randomize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lookback_core.config import LookBackConfig, preset
from lookback_core.temporal_unet import create_lookback_unet
from lookback_core.weights import (
    FORMAT_TAG,
    TemporalWeightsError,
    load_lookback_unet,
    read_temporal_header,
    save_temporal_weights,
)


@pytest.fixture
def trained(tiny_unet):
    model = create_lookback_unet(tiny_unet, preset("light"))
    randomize(model.temporal)
    return model


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _rewrite(path: Path, tensors: dict, metadata: dict) -> None:
    save_file(tensors, path, metadata=metadata)


def test_round_trip_restores_modules_and_output(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained, training={"frames": 32, "stride": 4})
    loaded = load_lookback_unet(path, make_tiny_unet())
    assert loaded.config == trained.config
    for key, value in trained.temporal.site_state_dict().items():
        assert torch.equal(loaded.temporal.site_state_dict()[key], value), key
    x = torch.randn(1, 4, 3, 16, 16)
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 50, ctx), trained(x, 50, ctx))


def test_file_holds_only_temporal_tensors_keyed_by_site(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    keys = set(load_file(path))
    assert "output.5.lookback.weight" in keys and "middle.adapter.weight" in keys
    assert all(k.split(".")[0] in ("input", "middle", "output") for k in keys)
    assert len({k.rsplit(".", 2)[0] for k in keys}) == 21


def test_metadata_describes_config_family_and_training(trained, tmp_path) -> None:
    facts = {"frames": 32, "stride": 4, "resolution": 256, "steps": 10}
    path = save_temporal_weights(tmp_path / "w.safetensors", trained, training=facts)
    meta = _metadata(path)
    assert meta["format"] == FORMAT_TAG and meta["format_version"] == "1"
    assert meta["base_family"] == "sd15"
    assert json.loads(meta["training"]) == facts
    header = read_temporal_header(path)
    assert header.config.depth == 3 and header.config.kernel == 3 and header.config.channels["input.1"] == 32
    assert header.training == facts and header.base_family == "sd15" and header.recommended_sampler == {}
    assert "recommended_sampler" not in meta


def test_recommended_sampler_settings_round_trip(trained, tmp_path) -> None:
    path = save_temporal_weights(
        tmp_path / "w.safetensors", trained, recommended_sampler={"steps": 20, "cfg_scale": 2.5}
    )
    assert read_temporal_header(path).recommended_sampler == {"steps": 20, "cfg_scale": 2.5}
    with pytest.raises(ValueError, match=r"cfg_scale=nan must be a number in 0\.\.100"):
        save_temporal_weights(
            tmp_path / "x.safetensors", trained, recommended_sampler={"cfg_scale": float("nan")}
        )
    with pytest.raises(ValueError, match=r"unknown recommended sampler setting\(s\) \['guidance'\]"):
        save_temporal_weights(tmp_path / "x.safetensors", trained, recommended_sampler={"guidance": 2})


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ('{"steps": 0}', "steps=0 must be a whole number in 1..1000"),
        ("[1, 2]", "must be a JSON object"),
        ("{", "invalid"),
    ],
)
def test_bad_recommended_sampler_metadata_is_named(trained, tmp_path, stored, message) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    tensors = load_file(path)
    save_file(tensors, path, metadata={**_metadata(path), "recommended_sampler": stored})
    with pytest.raises(
        TemporalWeightsError, match="w.safetensors.*recommended_sampler metadata is invalid"
    ) as err:
        read_temporal_header(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("key", "stored", "message"),
    [
        ("training", "{", "training metadata is invalid"),
        ("training", "[1]", "training metadata is invalid (a JSON object was expected, got list)"),
        (
            "horizon_frames",
            "1",
            "chunking metadata is invalid (horizon_frames must be a whole number of frames >= 2",
        ),
        ("horizon_frames", "many", "chunking metadata is invalid (horizon_frames must"),
        ("horizon_frames", "5", "context_frames (5) must be below horizon_frames (5)"),
        (
            "context_frames",
            "0",
            "chunking metadata is invalid (context_frames must be a whole number of frames >= 1",
        ),
    ],
)
def test_bad_training_and_chunking_metadata_is_named_as_such(trained, tmp_path, key, stored, message) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained, horizon_frames=16, context_frames=5)
    header = read_temporal_header(path)
    assert (header.horizon_frames, header.context_frames) == (16, 5)
    save_file(load_file(path), path, metadata={**_metadata(path), key: stored})
    with pytest.raises(TemporalWeightsError, match="w.safetensors") as err:
        read_temporal_header(path)
    assert message in str(err.value) and "config metadata" not in str(err.value)


def test_a_chunk_context_needs_a_longer_horizon(trained, tmp_path) -> None:
    for horizon, context in ((None, 3), (4, 4)):
        with pytest.raises(
            ValueError, match=f"context_frames \\({context}\\) must be below horizon_frames \\({horizon}\\)"
        ):
            save_temporal_weights(
                tmp_path / "w.safetensors", trained, horizon_frames=horizon, context_frames=context
            )
    assert not (tmp_path / "w.safetensors").exists()
    header = read_temporal_header(
        save_temporal_weights(tmp_path / "w.safetensors", trained, horizon_frames=16)
    )
    assert header.context_frames is None


def test_save_is_atomic_and_leaves_no_temp_files(trained, tmp_path, monkeypatch) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    before = path.read_bytes()

    def dies_half_way(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("lookback_core.atomic.save_file", dies_half_way)
    randomize(trained.temporal, seed=7)
    with pytest.raises(KeyboardInterrupt):
        save_temporal_weights(path, trained)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(TemporalWeightsError, match=r"nope\.safetensors.*no such file"):
        load_lookback_unet(tmp_path / "nope.safetensors", make_tiny_unet())


def test_corrupt_file_is_named(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TemporalWeightsError, match=r"w\.safetensors"):
        load_lookback_unet(path, make_tiny_unet())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not safetensors")
    with pytest.raises(TemporalWeightsError, match="not a readable .safetensors"):
        load_lookback_unet(garbage, make_tiny_unet())


def test_base_checkpoint_is_not_taken_for_temporal_weights(tmp_path) -> None:
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(TemporalWeightsError, match="not a look-back temporal weights file"):
        load_lookback_unet(path, make_tiny_unet())


def test_wrong_family_is_named(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained, base_family="sdxl")
    with pytest.raises(TemporalWeightsError, match="'sdxl'.*'sd15'"):
        load_lookback_unet(path, make_tiny_unet())


def test_newer_format_version_is_refused(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    _rewrite(path, load_file(path), {**_metadata(path), "format_version": "99"})
    with pytest.raises(TemporalWeightsError, match="format version '99'"):
        load_lookback_unet(path, make_tiny_unet())


def test_missing_and_extra_tensors_are_listed(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    tensors = load_file(path)
    del tensors["output.3.mix.weight"]
    tensors["output.3.extra"] = torch.zeros(1)
    _rewrite(path, tensors, _metadata(path))
    with pytest.raises(TemporalWeightsError) as err:
        load_lookback_unet(path, make_tiny_unet())
    assert "missing tensor 'output.3.mix.weight'" in str(err.value)
    assert "unexpected tensor 'output.3.extra'" in str(err.value)


def test_shape_mismatch_is_named(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    tensors = load_file(path)
    tensors["input.4.lookback.weight"] = tensors["input.4.lookback.weight"][:, :-1].contiguous()
    _rewrite(path, tensors, _metadata(path))
    with pytest.raises(TemporalWeightsError, match=r"'input.4.lookback.weight' has shape"):
        load_lookback_unet(path, make_tiny_unet())


def test_weights_for_another_unet_width_are_refused(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (48, 64, 64, 64)})
    with pytest.raises(TemporalWeightsError, match=r"site 'input.1' has 48 channels in this UNet but 32"):
        load_lookback_unet(path, wider)


def test_site_absent_from_unet_is_named(tmp_path) -> None:
    unet = make_tiny_unet()
    model = create_lookback_unet(unet, LookBackConfig(depth=2, kernel=3, sites=("middle",)))
    path = save_temporal_weights(tmp_path / "w.safetensors", model)
    meta = _metadata(path)
    config = json.loads(meta["config"])
    config["sites"] = ["input.3"]
    config["channels"] = {"input.3": 64}
    tensors = {k.replace("middle", "input.3"): v for k, v in load_file(path).items()}
    _rewrite(path, tensors, {**meta, "config": json.dumps(config)})
    with pytest.raises(TemporalWeightsError, match="site 'input.3' does not exist"):
        load_lookback_unet(path, make_tiny_unet())


def test_non_finite_weights_are_refused(trained, tmp_path) -> None:
    trained.temporal["middle"].mix.weight.data[0, 0] = float("nan")
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    with pytest.raises(TemporalWeightsError, match="'middle.mix.weight' holds NaN"):
        load_lookback_unet(path, make_tiny_unet())


def _claim(path: Path, **claims) -> None:
    """Rewrite the header's config to claim ``claims`` (e.g. a larger depth), keeping the small tensors."""
    meta = _metadata(path)
    config = json.loads(meta["config"])
    _rewrite(path, load_file(path), {**meta, "config": json.dumps({**config, **claims})})


def test_a_header_claiming_huge_modules_is_refused_before_anything_is_allocated(trained, tmp_path) -> None:
    """A small file whose config claims d=64 with 15x15 kernels (the largest the config rules allow,
    about 5 GB of fp32 modules for this UNet) must be refused on its header: the child process's
    peak memory stays far below what the claim needs. (d=1500 is refused by the rules themselves.)"""
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    _claim(path, depth=1500)
    with pytest.raises(TemporalWeightsError, match="depth must be a whole number in 1..64, got 1500"):
        read_temporal_header(path)
    _claim(path, depth=64, kernel=15)
    claimed = 64 * sum(n * n * 15 * 15 * 4 for n in trained.config.channels.values())
    assert claimed > 3e9
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_tiny_unet
from lookback_core.weights import TemporalWeightsError, load_lookback_unet
try:
    load_lookback_unet({str(path)!r}, make_tiny_unet())
except TemporalWeightsError as err:
    print("refused:", err)
print("peak", {PEAK_RSS_EXPRESSION})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "refused:" in out and "'input.1.lookback.weight' has shape" in out, out
    peak = int(out.rsplit("peak", 1)[1])
    assert peak < 1e9 < claimed, f"peak {peak / 2**20:.0f} MiB"


def test_integer_tensors_are_refused(trained, tmp_path) -> None:
    path = save_temporal_weights(tmp_path / "w.safetensors", trained)
    tensors = load_file(path)
    tensors["middle.mix.bias"] = tensors["middle.mix.bias"].to(torch.int32)
    _rewrite(path, tensors, _metadata(path))
    with pytest.raises(TemporalWeightsError, match=r"'middle.mix.bias' is I32; expected floating point"):
        load_lookback_unet(path, make_tiny_unet())


def test_fp64_weights_load_exactly_into_an_fp64_unet(trained, tmp_path) -> None:
    """Values that fp32 cannot hold survive: the modules are made in the UNet's dtype before loading."""
    model = trained.double()
    with torch.no_grad():
        for param in model.temporal.parameters():
            param += 1e-12 * torch.randn_like(param)
    path = save_temporal_weights(tmp_path / "w.safetensors", model)
    stored = load_file(path)
    assert not torch.equal(stored["middle.mix.bias"], stored["middle.mix.bias"].float().double())
    loaded = load_lookback_unet(path, make_tiny_unet().double())
    for key, value in loaded.temporal.site_state_dict().items():
        assert value.dtype == torch.float64 and torch.equal(value, stored[key]), key
