"""The toy build's decoder stage: the VAE's decoder trained further, its encoder frozen.

The base stage's VAE stops where its budget does (2000 steps of 8 frames: 28.2 dB on held-out
frames), and every toy figure measured on pixels sees its decoder: frame 0 of a video is the
round trip of the start image, and the background of the round trip of a true clip already
changes by 3.6 levels where the object moves. Training the decoder alone changes no latent: the
encoder, and so the latent space the UNet and the look-back modules learned, stays as it was.
So the stage runs after the look-back stage and leaves its training (and its latent cache)
untouched; the packaged checkpoint carries the tuned decoder.

Files, in ``<out>/decoder/``: ``vae.safetensors`` (the tuned VAE, diffusers names) and
``decoder_facts.json`` (the recipe values it was made with, its PSNR before and after, its time).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from lookback_core.atomic import save_safetensors, write_text
from lookback_core.ldm_export import replace_vae
from lookback_core.sd15 import load_sd15

from .base_model import FramePool, fit_reconstruction, held_out_psnr, read_stage_facts

BATCH_SIZE = 16  # frames a step (the base stage's VAE took 8)
VAE_FILE = "vae.safetensors"
FACTS_FILE = "decoder_facts.json"


def tune_decoder(
    vae: AutoencoderKL, train_clips: int, steps: int, learning_rate: float, seed: int
) -> dict[str, float]:
    """Train ``vae``'s decoder (and the 1x1 conv before it) on the frames of the first
    ``train_clips`` clips, the encoder frozen; returns the held-out PSNR before and after."""
    before = held_out_psnr(vae)
    vae.requires_grad_(False)
    decoder = [*vae.post_quant_conv.requires_grad_().parameters(), *vae.decoder.requires_grad_().parameters()]
    torch.manual_seed(seed)
    fit_reconstruction(
        vae, decoder, FramePool(train_clips, seed + 3), steps, BATCH_SIZE, learning_rate, "decoder"
    )
    vae.requires_grad_(False)
    return {"vae_psnr_db_before": round(float(before), 2), "vae_psnr_db": round(float(held_out_psnr(vae)), 2)}


def decoder_stage(folder: Path, checkpoint: Path, fields: dict[str, int | float]) -> dict:
    """Tune the decoder of ``checkpoint``'s VAE into ``folder`` with ``fields`` (``decoder_steps``,
    ``decoder_learning_rate``, ``train_clips``, ``seed`` and any more values the result depends on,
    recorded for the reuse check); a finished stage's files are kept. Returns its facts."""
    facts_file = folder / FACTS_FILE
    done = read_stage_facts(facts_file, [*fields, "seconds"])
    if (folder / VAE_FILE).is_file() and done is not None:
        print(f"{folder / VAE_FILE} exists: the decoder stage is skipped (delete it to retrain)")
        return done
    if (folder / VAE_FILE).is_file():
        print(f"{folder / VAE_FILE} has no complete {FACTS_FILE} (a build stopped before it): tuning again")
    started = time.time()
    vae = load_sd15(checkpoint).vae.float()
    facts = tune_decoder(
        vae, fields["train_clips"], fields["decoder_steps"], fields["decoder_learning_rate"], fields["seed"]
    )
    facts |= {**fields, "seconds": round(time.time() - started)}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(vae.state_dict(), folder / VAE_FILE)
    write_text(facts_file, json.dumps(facts, indent=2, sort_keys=True))  # last: the stage is done
    return facts


def with_tuned_decoder(checkpoint: Path, folder: Path, target: Path) -> Path:
    """``checkpoint`` with its VAE replaced by the decoder stage's (in ``folder``), at ``target``."""
    vae = load_sd15(checkpoint).vae
    vae.load_state_dict(load_file(folder / VAE_FILE))
    return replace_vae(checkpoint, vae, target)
