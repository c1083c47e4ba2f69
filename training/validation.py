"""Validation during training: short videos from fixed image/prompt pairs, side by side in one grid
video per validation step and each alone, with the ISIM of each."""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from lookback_core.image_prep import fit_to_multiple, load_image
from lookback_core.metrics import ClipImageFeatures, isim_curve, isim_summary, latent_features
from lookback_core.pipeline import decode_latents
from lookback_core.sampler import SamplerSettings, sample_video
from lookback_core.sd15 import SD15Components
from lookback_core.temporal_unet import LookBackUNet
from lookback_core.video_io import write_video
from training.args import recommended_sampler
from training.buckets import bucket_for
from training.cache import Encoders
from training.dataset_config import read_dataset_config


def validation_size(args, width: int, height: int) -> tuple[int, int]:
    """The frame size of the validation video of a ``width`` x ``height`` image: square at
    ``--resolution``, or with a dataset config the bucket its first dataset's first resolution
    gives the image (training.buckets; square if that dataset has no buckets)."""
    if args.dataset_config is None:
        return args.resolution, args.resolution
    spec = read_dataset_config(args.dataset_config)[0]
    resolution = spec.resolution[0]
    if not spec.buckets:
        return resolution, resolution
    return bucket_for(width, height, resolution) or (resolution, resolution)


def validation_shortfall(args, device: torch.device, size: tuple[int, int]) -> str | None:
    """Why the validation video (``--validation_frames`` sampled in one piece at ``size``, width and
    height) does not fit in ``device``'s memory, or ``None``; from the same estimate ``generate``
    uses (:mod:`lookback_core.memory`), before any model loads."""
    from lookback_core.checkpoint_file import CheckpointError, tensor_elements
    from lookback_core.memory import estimate_generate, shortfall

    try:
        parameters = tensor_elements(Path(args.pretrained_model))
    except (CheckpointError, OSError):  # named when the checkpoint loads
        parameters = 0
    needed = estimate_generate(
        width=size[0], height=size[1], frames=args.validation_frames,
        frames_at_once=args.validation_frames, guidance=args.validation_guidance_scale != 1,
        parameters=parameters, file_bytes=0, dtype=torch.float32,
    )  # fmt: skip
    problem = shortfall(needed, device)
    if problem is None:
        return None
    return (
        f"--validation_frames {args.validation_frames}: the validation video ({args.validation_frames} frames of "
        f"{size[0]}x{size[1]} in one piece) {problem} ({needed.describe()}); use fewer "
        "--validation_frames or leave out --validation_image"
    )


def check_validation_inputs(args, device: torch.device | None = None) -> None:
    """Read ``--validation_image`` and load ``--isim_clip_model`` once, before training starts, so
    that a bad one is named at once instead of at the first validation step; and refuse a
    validation video that cannot fit on ``device`` (default: the CPU) before the models load."""
    sizes = []
    for image in args.validation_image:
        try:
            height, width = load_image(image).shape[-2:]
        except (OSError, ValueError) as err:
            raise ValueError(f"--validation_image: {err}") from None
        sizes.append(validation_size(args, width, height))
    if sizes:
        problem = validation_shortfall(
            args, device or torch.device("cpu"), max(sizes, key=lambda s: s[0] * s[1])
        )
        if problem:
            raise ValueError(problem)
    if args.isim_clip_model:
        try:
            ClipImageFeatures(args.isim_clip_model)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"--isim_clip_model {args.isim_clip_model}: not a loadable CLIP vision model folder "
                f"(a transformers CLIPVisionModelWithProjection: config.json and its weights) ({err})"
            ) from None


@torch.no_grad()
def run_validation(
    args, model: LookBackUNet, components: SD15Components, folder: Path, step: int, inputs: Encoders
) -> dict[str, float]:
    """Write ``folder/step-<step>.mp4`` (the pairs' videos side by side, in rows of up to
    :data:`GRID_COLUMNS`) and, for several pairs, each alone as ``folder/step-<step>/<k>.mp4``;
    return the ISIM figures (``isim_*``, or ``isim_latent_*`` without a CLIP model) averaged over
    the pairs, and each pair's with ``_<k>`` appended (k from 0, the pairs' order)."""
    name = f"step-{step:07d}"
    device = next(model.unet.parameters()).device
    clip = ClipImageFeatures(args.isim_clip_model, device) if args.isim_clip_model else None  # once a step
    videos, figures = [], []
    for image_path, prompt in zip(args.validation_image, args.validation_prompt, strict=True):
        frames, isim = _validation_video(args, model, components, inputs, image_path, prompt, clip)
        videos.append(frames)
        figures.append(isim)
    if len(videos) > 1:
        for k, frames in enumerate(videos):
            write_video(frames, folder / name / f"{k}.mp4", fps=VALIDATION_FPS)
    write_video(grid(videos), folder / f"{name}.mp4", fps=VALIDATION_FPS)
    result = {key: sum(f[key] for f in figures) / len(figures) for key in figures[0]}
    if len(figures) > 1:
        result |= {f"{key}_{k}": value for k, f in enumerate(figures) for key, value in f.items()}
    return result


VALIDATION_FPS = 8
GRID_COLUMNS = 4


def grid(videos: list[torch.Tensor]) -> torch.Tensor:
    """Videos ``[f, h, w, 3]`` side by side, ``GRID_COLUMNS`` to a row, each centred on black in a
    cell of the largest height and width (their aspect ratios may differ); a short last row is
    filled with black."""
    columns = min(len(videos), GRID_COLUMNS)
    height, width = max(v.shape[1] for v in videos), max(v.shape[2] for v in videos)
    cells = []
    for video in videos:
        cell = video.new_zeros(video.shape[0], height, width, video.shape[3])
        top, left = (height - video.shape[1]) // 2, (width - video.shape[2]) // 2
        cell[:, top : top + video.shape[1], left : left + video.shape[2]] = video
        cells.append(cell)
    cells += [torch.zeros_like(cells[0])] * (-len(cells) % columns)
    return rearrange(torch.stack(cells), "(r c) f h w ch -> f (r h) (c w) ch", c=columns)


def _validation_video(
    args,
    model: LookBackUNet,
    components: SD15Components,
    inputs: Encoders,
    image_path: str,
    prompt: str,
    clip: ClipImageFeatures | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One pair's video ``[f, h, w, 3]`` in 0..1 and its ISIM figures (the paper's CLIP ISIM with
    ``clip``, else in latent space)."""
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    image = load_image(image_path)
    width, height = validation_size(args, image.shape[-1], image.shape[-2])
    image, _ = fit_to_multiple(image, width=width, height=height, min_size=8)
    z0 = inputs.image_latent(image_path, image).to(device, dtype)
    texts = inputs.prompts([prompt, ""], device)
    settings = SamplerSettings(**recommended_sampler(args), seed=args.seed)
    latents = sample_video(
        model,
        z0,
        texts[:1].to(dtype),
        texts[1:].to(dtype),
        args.validation_frames,
        settings,
        components.scheduler_config,
    )
    frames = decode_latents(components.vae, latents)[0]
    if clip is not None:
        features = clip(torch.cat([image, frames]))
        reference, features, name = features[0], features[1:], "isim"
    else:
        features = latent_features(latents[0].float().cpu())
        reference, name = features[0], "isim_latent"
    summary = isim_summary(isim_curve(features, reference))
    return frames.permute(0, 2, 3, 1).float().cpu(), {
        f"{name}_{key}": value for key, value in summary.items()
    }
