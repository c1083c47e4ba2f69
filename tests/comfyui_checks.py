"""Checks of the native nodes inside ComfyUI's own sampling, run by ComfyUI's Python.

``python tests/comfyui_checks.py CHECKPOINT OUT_DIR`` (with ``COMFYUI_PATH`` set) loads a full-size
SD1.5 checkpoint through ComfyUI, applies look-back weights written for it, samples with
KSampler's code path (``comfy.sample.sample``) and writes what it measured to
``OUT_DIR/results.json``; tests/test_comfyui_native.py asserts on it. A separate process, so the
suite's own interpreter never imports ComfyUI (whose ``nodes`` module shares our package's name).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI_PATH = __import__("os").environ["COMFYUI_PATH"]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
sys.path.append(COMFYUI_PATH)  # after the repo: our ``nodes`` package wins over ComfyUI's nodes.py

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from lookback_core.config import LookBackConfig  # noqa: E402
from lookback_core.sampler import SamplerSettings, sample_video  # noqa: E402
from lookback_core.sd15 import load_sd15  # noqa: E402
from lookback_core.sites import ldm_site_channels  # noqa: E402
from lookback_core.temporal_unet import TemporalModules  # noqa: E402
from lookback_core.weights import load_lookback_unet, save_temporal_weights  # noqa: E402
from nodes import host  # noqa: E402
from nodes.native import (  # noqa: E402
    LookBackExtendVideo,
    LookBackImageToVideo,
    LookBackJoinVideo,
    apply_lookback,
    read_weights,
)

SCALE = 0.18215  # SD1.5's latent scale (ComfyUI's process_latent_in)
SIZE, FRAMES, SEED = 64, 4, 7
SD15_CHANNELS = ldm_site_channels(320, [1, 2, 4, 4], 2)


def write_weights(path: Path, channels: dict[str, int], seed: int = 0) -> Path:
    """Look-back weights at all 21 sites (d=2, 1x1 look-back to keep memory small, 3x3x3 adapter),
    small random values."""
    config = LookBackConfig(depth=2, kernel=1, channels=channels)
    temporal = TemporalModules(config)
    g = torch.Generator().manual_seed(seed)
    for p in temporal.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.02
    return save_temporal_weights(path, temporal)


def start_image() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    return torch.stack([xs, ys, (xs + ys) / 2], -1)[None]


class UNetInputs:
    """A DIFFUSION_MODEL wrapper that records, per UNet call, the chunks, and how far the pinned
    frames of each chunk are from their clean latents ``pinned`` ``[k, c, h, w]`` (scaled)."""

    def __init__(self, pinned: torch.Tensor) -> None:
        self.pinned, self.calls, self.frame0_error = pinned, [], 0.0

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        chunks = transformer_options["cond_or_uncond"]
        frames = x.shape[0] // len(chunks)
        self.calls.append((len(chunks), frames))
        k, (h, w) = self.pinned.shape[0], x.shape[-2:]
        pinned = self.pinned[..., :h, :w].to(x)  # an area conditioning's crop (placed at 0, 0 here)
        for i in range(len(chunks)):
            error = (x[i * frames : i * frames + k] - pinned).abs().max().item()
            self.frame0_error = max(self.frame0_error, error)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def watch(model, pinned: torch.Tensor) -> tuple:
    recorder = UNetInputs(pinned)
    watched = model.clone()
    watched.add_wrapper_with_key("diffusion_model", "check", recorder)
    return watched, recorder


def ksample(model, latent, positive, negative, sampler="ddim", scheduler="ddim_uniform", steps=10, cfg=3.0):
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    out = comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent["samples"],
        noise_mask=latent["noise_mask"], seed=SEED, disable_pbar=True,
    )  # fmt: skip
    return out, noise


def main(checkpoint: Path, out: Path) -> None:
    results: dict = {}
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(checkpoint), output_vae=True, output_clip=True
    )[:3]
    weights_path = write_weights(out / "lookback_full.safetensors", SD15_CHANNELS)
    weights = read_weights(weights_path)
    patched = apply_lookback(model, weights)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red square moving left"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    (latent,) = LookBackImageToVideo().encode(vae, start_image(), FRAMES)
    start = latent["samples"][:1] * SCALE

    # 1. equal to the core sampler: DDIM (ddim + ddim_uniform) against lookback_core.sampler
    watched, recorder = watch(patched, start)
    native, noise = ksample(watched, latent, positive, negative)
    components = load_sd15(checkpoint)
    core_model = load_lookback_unet(weights_path, components.unet).eval()
    # Same end point: ComfyUI's last step goes to sigma 0, DDIM's to alphas_cumprod[0] unless
    # set_alpha_to_one. Same start: KSampler starts below sigma_max at x = sigma * noise (not
    # sqrt(sigma^2 + 1) * noise), i.e. DDIM's x_t = sqrt(1 - alphas_cumprod[t]) * noise.
    scheduler_config = {**components.scheduler_config, "set_alpha_to_one": True}
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(10)
    first = float(ddim.alphas_cumprod[ddim.timesteps[0]])
    core_noise = rearrange(noise[1:], "f c h w -> 1 c f h w") * math.sqrt(1 - first)
    core = sample_video(
        core_model, start, positive[0][0], negative[0][0], FRAMES, SamplerSettings(steps=10, cfg_scale=3.0, seed=SEED),
        scheduler_config, noise=core_noise,
    )  # fmt: skip
    native_scaled = rearrange(native * SCALE, "f c h w -> 1 c f h w")
    del components, core_model
    print("core comparison done", flush=True)
    results["core"] = {
        "max_abs_diff": (native_scaled - core).abs().max().item(),
        "magnitude": core[:, :, 1:].abs().max().item(),
        "frame0_error": (native[0] - latent["samples"][0]).abs().max().item(),
        "unet_frame0_error": recorder.frame0_error,
        "calls": sorted(set(recorder.calls)),
        "timesteps": [int(t) for t in ddim.timesteps],
    }
    # what the modules and the pinning change, for scale: the tolerance must be far below both
    plain, _ = ksample(model, latent, positive, negative)
    renoised = patched.clone()
    renoised.remove_wrappers_with_key(host.PREDICT_NOISE, "lookback_i2v")
    renoised_out, _ = ksample(renoised, latent, positive, negative)
    results["core"]["without_modules_diff"] = (
        (rearrange(plain * SCALE, "f c h w -> 1 c f h w") - core).abs().max().item()
    )
    results["core"]["renoised_frame0_diff"] = ((renoised_out - native) * SCALE).abs().max().item()

    print("pinning effects measured", flush=True)

    # 2. every sampler and scheduler: frame 0 is the image at every UNet call and in the result
    results["samplers"] = {}
    for sampler, scheduler in [("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "normal"),
                               ("euler_ancestral", "karras"), ("ddim", "ddim_uniform")]:  # fmt: skip
        watched, recorder = watch(patched, start)
        out_, _ = ksample(watched, latent, positive, negative, sampler, scheduler, steps=4)
        results["samplers"][f"{sampler}/{scheduler}"] = {
            "frame0_error": (out_[0] - latent["samples"][0]).abs().max().item(),
            "unet_frame0_error": recorder.frame0_error,
            "finite": bool(torch.isfinite(out_).all()),
            "frames_moved": (out_[1:] - latent["samples"][0]).abs().mean().item(),
            "calls": sorted(set(recorder.calls)),
        }

    print("samplers done", flush=True)

    # 3. conditioning shapes: cfg 1 (no uncond), combined prompts, an area, a strength
    second = clip.encode_from_tokens_scheduled(clip.tokenize("a blue circle"))
    area = [[c, {**d, "area": (4, 4, 0, 0), "strength": 1.0}] for c, d in second]
    weak = [[c, {**d, "strength": 0.5}] for c, d in second]
    results["conditioning"] = {}
    for name, (pos, cfg) in {"cfg1": (positive, 1.0), "combined": (positive + second, 3.0),
                             "area": (positive + area, 3.0), "strength": (positive + weak, 3.0)}.items():  # fmt: skip
        watched, recorder = watch(patched, start)
        out_, _ = ksample(watched, latent, pos, negative, "euler", "normal", steps=3, cfg=cfg)
        results["conditioning"][name] = {
            "frame0_error": (out_[0] - latent["samples"][0]).abs().max().item(),
            "unet_frame0_error": recorder.frame0_error,
            "calls": sorted(set(recorder.calls)),
            "differs_from_plain_prompt": (out_ - ksample(patched, latent, positive, negative, "euler", "normal", 3, cfg)[0]).abs().max().item(),
        }  # fmt: skip

    print("conditioning done", flush=True)

    # 4. a long video: the next chunk continues from the last 2 frames, pinned
    (chunk,) = LookBackExtendVideo().extend({"samples": native}, frames=3, context_frames=2)
    watched, recorder = watch(patched, native[-2:] * SCALE)
    sampled, _ = ksample(watched, chunk, positive, negative, "dpmpp_2m", "karras", steps=4)
    (joined,) = LookBackJoinVideo().join({"samples": native}, {**chunk, "samples": sampled})
    results["long_video"] = {
        "context_error": (sampled[:2] - native[-2:]).abs().max().item(),
        "unet_context_error": recorder.frame0_error,
        "frames": joined["samples"].shape[0],
        "calls": sorted(set(recorder.calls)),
    }

    print("long video done", flush=True)

    # 5. a LoRA (core loader path) reaches the UNet under the look-back modules
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(1)
    lora = {f"{key}.lora_down.weight": torch.randn(4, 320, generator=g), f"{key}.lora_up.weight": torch.randn(320, 4, generator=g),
            f"{key}.alpha": torch.tensor(4.0)}  # fmt: skip
    results["lora"] = {}
    for strength in (0.0, 1.0):
        with_lora, _ = comfy.sd.load_lora_for_models(model, clip, lora, strength, 0.0)
        out_, _ = ksample(
            apply_lookback(with_lora, weights), latent, positive, negative, "euler", "normal", 3
        )
        base_, _ = ksample(patched, latent, positive, negative, "euler", "normal", 3)
        results["lora"][str(strength)] = (out_[1:] - base_[1:]).abs().max().item()

    # 6. refusals name both sides
    wrong = write_weights(out / "lookback_wide.safetensors", {s: 2 * n for s, n in SD15_CHANNELS.items()})
    for name, call in {"wrong_channels": lambda: apply_lookback(model, read_weights(wrong)),
                       "twice": lambda: apply_lookback(patched, weights)}.items():  # fmt: skip
        try:
            call()
            results[name] = None
        except ValueError as err:
            results[name] = str(err)
    results["additional_models"] = [
        type(m.model).__name__ for m in patched.get_additional_models_with_key("lookback_i2v")
    ]
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
