"""The cache step: ``python training/train.py ... --cache_dir CACHE --cache_only``.

Encodes every clip window of the run's datasets (``--cache_clips_per_video`` per video, resolution
and frame count, placed by ``--cache_windows``), the empty caption and the validation prompts and
images into the latent cache, with a progress bar, then writes the manifest of those settings
(training.cache). An entry already in the cache is not encoded again, so a killed step resumes
where it stopped; with several processes each encodes its share and the main one writes the
manifest. A training run of the same settings (same data, windows, seed for random windows,
validation pairs, base checkpoint and precision) then reads every clip from the cache and loads
neither the VAE encoder nor the text encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from lookback_core.atomic import write_text
from lookback_core.image_prep import fit_to_multiple, load_image
from lookback_core.latents import encode_latents
from lookback_core.precision import dtype_named
from lookback_core.sd15 import load_sd15
from training.args import datasets
from training.cache import (
    Encoders,
    LatentCache,
    cache_settings,
    checkpoint_fingerprint,
    image_key,
    prompt_key,
)
from training.data import ClipTooShort, ClipWindows, VideoClipDataset, clip_items, clip_key
from training.dataset_config import DatasetSpec
from training.validation import validation_size

logger = logging.getLogger("lookback.cache")


def clip_windows(args: argparse.Namespace) -> ClipWindows | None:
    return ClipWindows(args.cache_clips_per_video, args.cache_windows) if args.cache_dir else None


def open_cache(
    args: argparse.Namespace, specs: list[DatasetSpec], dtype: torch.dtype
) -> tuple[LatentCache, str, dict | None]:
    """The run's cache, the name of its settings' manifest and that manifest (``None`` until the
    cache step has finished for these settings)."""
    cache = LatentCache(args.cache_dir, checkpoint_fingerprint(args.pretrained_model, args.config_dir, dtype))
    windows = clip_windows(args)
    facts = {
        "datasets": [{**asdict(spec), "path": str(Path(spec.path).resolve()),
                      "csv": spec.csv and str(Path(spec.csv).resolve())} for spec in specs],
        "windows": asdict(windows), "seed": args.seed if windows.mode == "random" else None,
        "validation": [[str(Path(i).resolve()), p] for i, p in zip(args.validation_image, args.validation_prompt, strict=True)],
    }  # fmt: skip
    settings = cache_settings(facts)
    return cache, settings, cache.manifest(settings)


def fill_cache(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """The cache step (see the module's text); returns the manifest's path."""
    dtype = dtype_named(accelerator.mixed_precision, default=torch.float32)
    specs = datasets(args)
    items, left_out = clip_items(specs)
    for path, reason in left_out:
        logger.warning("left out %s: %s", path, reason)
    windows = clip_windows(args)
    dataset = VideoClipDataset(items, seed=args.seed, windows=windows)
    cache, settings, _ = open_cache(args, specs, dtype)
    components = load_sd15(
        args.pretrained_model, config_dir=args.config_dir, device=accelerator.device, dtype=dtype
    )
    unique = {item.name: index for index, item in reversed(list(enumerate(items)))}  # a repeated item once
    jobs = [(name, index, k) for name, index in unique.items() for k in range(windows.count)]
    mine = jobs[accelerator.process_index :: accelerator.num_processes]
    found: dict[str, dict[int, str | None]] = {}  # item -> window -> its entry
    for name, index, window in tqdm(
        mine, desc="caching clips", unit="clip", disable=not accelerator.is_main_process
    ):
        found.setdefault(name, {})[window] = _cached_window(
            dataset, index, window, cache, components, accelerator.device
        )
    parts = cache.manifest_path(settings).with_name(f"{settings}.part-{accelerator.process_index}.json")
    write_text(parts, json.dumps(found))
    accelerator.wait_for_everyone()
    manifest_path = cache.manifest_path(settings)
    if accelerator.is_main_process:
        windows_found: dict[str, dict[int, str | None]] = {}
        for rank in range(accelerator.num_processes):
            part = parts.with_name(f"{settings}.part-{rank}.json")
            for name, keys in json.loads(part.read_text()).items():
                windows_found.setdefault(name, {}).update({int(k): v for k, v in keys.items()})
        # each item's entries in window order (epoch e takes item i's entry (e + i) % count, as
        # the windows themselves are taken without a manifest), each once (a short video has fewer
        # starts than windows); a window that gave no clip left out
        clips = {
            name: list(dict.fromkeys(w[k] for k in sorted(w) if w[k] is not None))
            for name, w in windows_found.items()
        }
        _cache_conditioning(args, cache, components, accelerator.device)
        manifest_path = cache.write_manifest(settings, {"clips": clips})
        for rank in range(accelerator.num_processes):
            parts.with_name(f"{settings}.part-{rank}.json").unlink(missing_ok=True)
        usable = sum(bool(k) for k in clips.values())
        logger.info(
            "cache step done: %d clip windows of %d items in %s (manifest %s); %d items gave no clip",
            sum(len(k) for k in clips.values()), usable, cache.folder, manifest_path.name, len(clips) - usable,
        )  # fmt: skip
    accelerator.wait_for_everyone()
    return manifest_path


def _cached_window(
    dataset: VideoClipDataset, index: int, window: int, cache: LatentCache, components, device: torch.device
) -> str | None:
    """Item ``index``'s clip ``window`` in the cache: its key (``None``: the clip cannot be made)."""
    item = dataset.items[index]
    try:
        caption = item.sample.caption
        start, stride = dataset.locate(item, index, window)
    except (ClipTooShort, OSError, ValueError) as err:
        logger.warning("no clip from %s: %s", item.sample.path, err)
        return None
    key = clip_key(item.sample, caption, start, stride, item.bucket)
    if cache.has(key):
        return key
    try:
        pixels = dataset.decode(item, start, stride)
    except (OSError, ValueError) as err:
        logger.warning("no clip from %s: %s", item.sample.path, err)
        return None
    with torch.no_grad():
        vae = components.vae
        latents = encode_latents(vae, pixels.to(device, vae.dtype)).permute(1, 0, 2, 3)
        text = Encoders(components).prompts([caption], device)[0]
    cache.put(key, {"latents": latents.float(), "text": text.float()})
    return key


def _cache_conditioning(
    args: argparse.Namespace, cache: LatentCache, components, device: torch.device
) -> None:
    """The empty caption (text dropout), the validation prompts and the validation images' latents."""
    encoders = Encoders(components)
    with torch.no_grad():
        for text in {"", *args.validation_prompt}:
            if not cache.has(prompt_key(text)):
                cache.put(prompt_key(text), {"text": encoders.prompts([text], device)[0].float()})
        for path in args.validation_image:
            image = load_image(path)
            width, height = validation_size(args, image.shape[-1], image.shape[-2])
            image, _ = fit_to_multiple(image, width=width, height=height, min_size=8)
            if not cache.has(image_key(path, width, height)):
                cache.put(
                    image_key(path, width, height), {"latents": encoders.image_latent(path, image).float()}
                )
