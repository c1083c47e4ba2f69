"""Checks of the native nodes inside ComfyUI's own sampling, run by ComfyUI's Python.

``python tests/comfyui_checks.py OUT_DIR [CHECKPOINT WEIGHTS]`` (with ``COMFYUI_PATH`` set) loads
the shipped toy model (by default) through the pack's own-config checkpoint loader into ComfyUI's
own MODEL, CLIP and VAE, compares those parts with the diffusers ones, applies the trained toy
look-back weights, samples with KSampler's code path (``comfy.sample.sample``) and writes what it
measured to ``OUT_DIR/results.json``; tests/test_comfyui_native.py asserts on it. A separate
process, so the suite's own interpreter never imports ComfyUI (whose ``nodes`` module shares our
package's name).
"""

from __future__ import annotations

import json
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
from lookback_core.latents import latent_scale  # noqa: E402
from lookback_core.long_video import sample_long_video  # noqa: E402
from lookback_core.pipeline import encode_image_latent, generate_latents  # noqa: E402
from lookback_core.prompts import encode_long_prompt, encode_prompt, match_token_lengths  # noqa: E402
from lookback_core.sampler import SamplerSettings, resolve_settings, sample_video  # noqa: E402
from lookback_core.sd15 import load_sd15  # noqa: E402
from lookback_core.temporal_unet import TemporalModules  # noqa: E402
from lookback_core.weights import load_lookback_unet, read_temporal_header, save_temporal_weights  # noqa: E402
from nodes import host  # noqa: E402
from nodes.native import (  # noqa: E402
    LookBackExtendVideo,
    LookBackImageToVideo,
    LookBackJoinVideo,
    apply_lookback,
    read_weights,
)
from nodes.own_config_checkpoint import load_own_config_checkpoint  # noqa: E402
from nodes.toy import LookBackToyStartImage  # noqa: E402
from toyworld.model import TOY_CHECKPOINT, TOY_WEIGHTS  # noqa: E402

FRAMES, SEED = 4, 7
CORE_FRAMES = 16  # the native-equals-core check: the toy's whole horizon at its recommended settings


def write_weights(path: Path, channels: dict[str, int], seed: int = 0) -> Path:
    """Look-back weights at every site (d=2, 1x1 look-back, 3x3x3 adapter), small random values."""
    config = LookBackConfig(depth=2, kernel=1, channels=channels)
    temporal = TemporalModules(config)
    g = torch.Generator().manual_seed(seed)
    for p in temporal.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.02
    return save_temporal_weights(path, temporal)


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


def ksample(
    model, latent, positive, negative, sampler="ddim", scheduler="ddim_uniform", steps=10, cfg=3.0, seed=SEED
):
    """What the KSampler node does with these inputs (its noise from ``prepare_noise``)."""
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    out = comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent["samples"],
        noise_mask=latent["noise_mask"], seed=seed, disable_pbar=True,
    )  # fmt: skip
    return out, noise


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger magnitude of the two."""
    return ((a - b).abs().max() / max(a.abs().max(), b.abs().max())).item()


def compare_parts(components, model, clip, vae, image: torch.Tensor, caption: str) -> dict:
    """ComfyUI's MODEL, CLIP and VAE against the diffusers parts on the same inputs."""
    g = torch.Generator().manual_seed(3)
    context_dim = components.unet.config.cross_attention_dim
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, context_dim, generator=g)
    t = torch.tensor([20.0, 700.0])
    with torch.no_grad():
        ours = components.unet(x, t, context).sample
        theirs = model.model.diffusion_model(x, timesteps=t, context=context)
        pixels = rearrange(image, "b h w c -> b c h w")
        mean = components.vae.encode(pixels * 2 - 1).latent_dist.mean
        decoded = (components.vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
        text = encode_prompt(components.tokenizer, components.text_encoder, [caption], "cpu")
    comfy_text = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0][0]
    comfy_latent = vae.encode(image)
    return {
        "unet": relative(theirs, ours),
        "vae_encode": relative(comfy_latent.float(), mean),
        "vae_decode": relative(vae.decode(mean).float(), rearrange(decoded, "b c h w -> b h w c")),
        "clip": relative(comfy_text.float(), text),
        "latent_scale": model.model.latent_format.scale_factor,
        "vae_scaling_factor": latent_scale(components.vae),
        "norm_groups": sorted(
            {m.num_groups for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.GroupNorm)}
        ),
    }


def core_comparison(
    components, core_model, patched, vae, image, positive, negative, steps, cfg, colour_match
) -> dict:
    """KSampler (ddim/ddim_uniform) against lookback_core.sampler, given the same start latent (as a
    ComfyUI user gets it: the user's VAE through Look-Back Image To Video), embeddings and noise
    (KSampler's for the whole latent, as it is: the core's convention is KSampler's), both colour
    matched as the weights recommend (Apply Look-Back's default); the core's own start latent for
    the same image is compared with that one too. Returns the figures and KSampler's frames."""
    (latent,) = LookBackImageToVideo().encode(vae, image, CORE_FRAMES)
    scale = patched.model.latent_format.scale_factor
    native, noise = ksample(patched, latent, positive, negative, steps=steps, cfg=cfg)
    start = encode_image_latent(components.vae, rearrange(image, "b h w c -> b c h w"))
    comfy_start = latent["samples"][:1] * scale
    core = sample_video(
        core_model, comfy_start, positive[0][0], negative[0][0], CORE_FRAMES,
        SamplerSettings(steps=steps, cfg_scale=cfg, seed=SEED, colour_match=colour_match),
        components.scheduler_config, noise=rearrange(noise, "f c h w -> 1 c f h w"),
    )  # fmt: skip
    native_scaled = rearrange(native * scale, "f c h w -> 1 c f h w")
    return {
        "max_abs_diff": (native_scaled - core).abs().max().item(),
        "magnitude": core[:, :, 1:].abs().max().item(),
        "start_latent_diff": (comfy_start - start).abs().max().item(),
        "frame0_error": (native[0] - latent["samples"][0]).abs().max().item(),
        "frames": native.shape[0],
        "steps": steps,
        "cfg": cfg,
        "colour_match": colour_match,
    }, native_scaled


def same_seed_comparison(components, core_model, native_scaled, image, caption, recommended) -> dict:
    """What ``generate --seed SEED`` samples from the same image and caption (the command line's
    path: the core's own VAE, CLIP and noise, the weights' recommended settings, no noise given)
    against KSampler's frames ``native_scaled`` for seed SEED at those settings."""
    texts = [
        encode_long_prompt(components.tokenizer, components.text_encoder, t, "cpu")[0] for t in (caption, "")
    ]
    positive, negative = match_token_lengths(*texts)
    settings, _ = resolve_settings({}, recommended, SEED)
    core = generate_latents(
        core_model, components.vae, rearrange(image, "b h w c -> b c h w"), positive, negative, CORE_FRAMES,
        settings, components.scheduler_config,
    )  # fmt: skip
    return {
        "max_abs_diff": (native_scaled - core).abs().max().item(),
        "magnitude": core[:, :, 1:].abs().max().item(),
        "seed": settings.seed,
        "steps": settings.steps,
        "cfg": settings.cfg_scale,
        "colour_match": settings.colour_match,
        "frames": core.shape[2],
    }


@torch.inference_mode()  # as ComfyUI's executor runs every node
def preview_checks(out: Path, patched, latent: dict, positive, negative) -> dict:
    """KSampler's step callback (``latent_preview.prepare_callback``, as the KSampler node makes it)
    under latent2rgb and TAESD previews (a TAESD decoder of random weights in a ``vae_approx``
    folder): the size of every preview sent per step, and the last step's final preview as an array."""
    import comfy.taesd.taesd
    import comfy.utils
    import folder_paths
    import latent_preview
    import numpy as np
    from safetensors.torch import save_file

    approx = out / "vae_approx"
    approx.mkdir(exist_ok=True)
    decoder = comfy.taesd.taesd.Decoder(latent_channels=4)
    save_file(decoder.state_dict(), approx / "taesd_decoder.safetensors")
    folder_paths.add_model_folder_path("vae_approx", str(approx))
    sent: list = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None, prompt_id=None: sent.append((value, total, preview))
    )
    results = {"taesd_decoder_name": patched.model.latent_format.taesd_decoder_name}
    for method in (comfy.cli_args.LatentPreviewMethod.Latent2RGB, comfy.cli_args.LatentPreviewMethod.TAESD):
        comfy.cli_args.args.preview_method = method
        sent.clear()
        steps = 3
        noise = comfy.sample.prepare_noise(latent["samples"], SEED)
        comfy.sample.sample(
            patched, noise, steps, 3.0, "euler", "normal", positive, negative, latent["samples"],
            noise_mask=latent["noise_mask"], seed=SEED, callback=latent_preview.prepare_callback(patched, steps),
        )  # fmt: skip
        per_step: dict = {}
        for value, _total, preview in sent:
            if preview is not None:
                per_step.setdefault(value, []).append(list(preview[1].size))
        last = next(preview for _value, _total, preview in reversed(sent) if preview is not None)
        picture = np.asarray(last[1].convert("RGB"), dtype=np.float64)
        results[method.value] = {"sizes": per_step, "last": picture.tolist(), "frames": latent["samples"].shape[0],
                                 "latent_size": list(latent["samples"].shape[-2:])}  # fmt: skip
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.NoPreviews
    comfy.utils.set_progress_bar_global_hook(None)
    return results


def main(out: Path, checkpoint: Path, weights_path: Path) -> None:
    results: dict = {}
    model, clip, vae = load_own_config_checkpoint(checkpoint)
    image, caption = LookBackToyStartImage().make(0)
    components = load_sd15(checkpoint)
    results["parts"] = compare_parts(components, model, clip, vae, image, caption)
    del components
    print("parts compared", flush=True)

    weights = read_weights(weights_path)
    patched = apply_lookback(model, weights)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    recommended = read_temporal_header(weights_path).recommended_sampler
    steps, cfg = recommended.get("steps", 25), recommended.get("cfg_scale", 3.0)

    # 1. equal to the core sampler on the trained toy, at the weights' recommended settings: given
    # KSampler's noise, and as `generate` samples with the same seed (no noise given)
    colour_match = recommended.get("colour_match", "off")
    components = load_sd15(checkpoint)
    core_model = load_lookback_unet(weights_path, components.unet, latent_scale=latent_scale(components.vae))
    core_model.eval()
    results["core"], native_scaled = core_comparison(
        components, core_model, patched, vae, image, positive, negative, steps, cfg, colour_match
    )
    results["same_seed"] = same_seed_comparison(
        components, core_model, native_scaled, image, caption, recommended
    )
    (latent,) = LookBackImageToVideo().encode(vae, image, FRAMES)
    scale = model.model.latent_format.scale_factor
    start = latent["samples"][:1] * scale
    watched, recorder = watch(patched, start)
    native, _ = ksample(watched, latent, positive, negative)
    results["core"]["unet_frame0_error"] = recorder.frame0_error
    results["core"]["calls"] = sorted(set(recorder.calls))
    # what the modules and the pinning change, for scale: the tolerance must be far below both
    plain, _ = ksample(model, latent, positive, negative)
    renoised = patched.clone()
    renoised.remove_wrappers_with_key(host.PREDICT_NOISE, "lookback_i2v")
    renoised_out, _ = ksample(renoised, latent, positive, negative)
    results["core"]["without_modules_diff"] = ((plain - native) * scale).abs().max().item()
    results["core"]["renoised_frame0_diff"] = ((renoised_out - native) * scale).abs().max().item()
    # the same seed in the core: its add-noise strategy is KSampler's ddim with a plain mask (frame 0
    # re-noised by ComfyUI's inpainting), and a long video's chunk i is KSampler's with seed + i on
    # Look-Back Extend Video's latent
    small = dict(steps=10, cfg_scale=3.0, seed=SEED, colour_match=colour_match)
    as_core = lambda x: rearrange(x * scale, "f c h w -> 1 c f h w")  # noqa: E731
    noised = sample_video(core_model, start, positive[0][0], negative[0][0], FRAMES,
                          SamplerSettings(**small, first_frame="noised"), components.scheduler_config)  # fmt: skip
    (chunk,) = LookBackExtendVideo().extend({"samples": native}, frames=2, context_frames=2)
    second, _ = ksample(patched, chunk, positive, negative, seed=SEED + 1)
    (joined,) = LookBackJoinVideo().join({"samples": native}, {**chunk, "samples": second})
    long = sample_long_video(core_model, start, positive[0][0], negative[0][0], FRAMES + 2, SamplerSettings(**small),
                             components.scheduler_config, chunk_frames=FRAMES, context_frames=2)  # fmt: skip
    results["core"]["noised_diff"] = (as_core(renoised_out) - noised).abs().max().item()
    results["core"]["noised_magnitude"] = noised[:, :, 1:].abs().max().item()
    results["core"]["long_video_diff"] = (as_core(joined["samples"]) - long).abs().max().item()
    results["core"]["long_video_magnitude"] = long[:, :, 1:].abs().max().item()
    results["core"]["long_video_frames"] = long.shape[2]
    del components, core_model
    print("core comparison done", flush=True)

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
    second = clip.encode_from_tokens_scheduled(clip.tokenize("a blue circle moving up"))
    area = [[c, {**d, "area": (4, 4, 0, 0), "strength": 1.0}] for c, d in second]
    weak = [[c, {**d, "strength": 0.5}] for c, d in second]
    results["conditioning"] = {}
    for name, (pos, cfg_) in {"cfg1": (positive, 1.0), "combined": (positive + second, 3.0),
                              "area": (positive + area, 3.0), "strength": (positive + weak, 3.0)}.items():  # fmt: skip
        watched, recorder = watch(patched, start)
        out_, _ = ksample(watched, latent, pos, negative, "euler", "normal", steps=3, cfg=cfg_)
        results["conditioning"][name] = {
            "frame0_error": (out_[0] - latent["samples"][0]).abs().max().item(),
            "unet_frame0_error": recorder.frame0_error,
            "calls": sorted(set(recorder.calls)),
            "differs_from_plain_prompt": (out_ - ksample(patched, latent, positive, negative, "euler", "normal", 3, cfg_)[0]).abs().max().item(),
        }  # fmt: skip
    print("conditioning done", flush=True)

    # 4. a long video: the next chunk continues from the last 2 frames, pinned
    (chunk,) = LookBackExtendVideo().extend({"samples": native}, frames=3, context_frames=2)
    watched, recorder = watch(patched, native[-2:] * scale)
    sampled, _ = ksample(watched, chunk, positive, negative, "dpmpp_2m", "karras", steps=4)
    (joined,) = LookBackJoinVideo().join({"samples": native}, {**chunk, "samples": sampled})
    results["long_video"] = {
        "context_error": (sampled[:2] - native[-2:]).abs().max().item(),
        "unet_context_error": recorder.frame0_error,
        "frames": joined["samples"].shape[0],
        "calls": sorted(set(recorder.calls)),
    }
    print("long video done", flush=True)

    # 5. a LoRA (ComfyUI's loader) reaches the UNet under the look-back modules
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    width = model.model.model_config.unet_config["model_channels"]
    g = torch.Generator().manual_seed(1)
    lora = {f"{key}.lora_down.weight": torch.randn(4, width, generator=g), f"{key}.lora_up.weight": torch.randn(width, 4, generator=g),
            f"{key}.alpha": torch.tensor(4.0)}  # fmt: skip
    results["lora"] = {}
    for strength in (0.0, 1.0):
        with_lora, _ = comfy.sd.load_lora_for_models(model, clip, lora, strength, 0.0)
        out_, _ = ksample(
            apply_lookback(with_lora, weights), latent, positive, negative, "euler", "normal", 3
        )
        base_, _ = ksample(patched, latent, positive, negative, "euler", "normal", 3)
        results["lora"][str(strength)] = (out_[1:] - base_[1:]).abs().max().item()

    # 6. live previews show every frame, with either previewer the user can choose
    results["previews"] = preview_checks(out, patched, latent, positive, negative)
    print("previews done", flush=True)

    # 7. refusals name both sides
    channels = weights.header.config.channels
    wrong = write_weights(out / "lookback_wide.safetensors", {s: 2 * n for s, n in channels.items()})
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
    results["weights_repr"] = repr(weights)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    given = [Path(a) for a in sys.argv[2:4]]
    main(Path(sys.argv[1]), *(given or [TOY_CHECKPOINT, TOY_WEIGHTS]))
