"""Train the toy world's base model: a tiny SD1.5-architecture VAE, UNet and CLIP text tower.

    python -m toyworld.base_model --output_dir runs/toy_base

This is not the product's trainer (``training/train.py`` trains look-back modules on a base
like this one); it makes the base that the toy world needs, since no pretrained SD1.5 fits a
CPU. Two stages, on frames drawn straight from :mod:`toyworld.world`:

1. VAE: an ``AutoencoderKL`` with SD1.5's 8x down-sampling and 4 latent channels, trained to
   reconstruct frames from its posterior *mean* with an MSE loss and no KL term (the mean is
   what every front end encodes with; the sampled latent's noise held reconstructions back in
   measurements). Its ``scaling_factor`` is then set so the scaled latents have unit variance,
   as SD1.5's 0.18215 does for its VAE.
2. Text-to-image: the UNet and the text tower (the real CLIP tokenizer, a tiny transformer)
   learn to denoise single frames given their captions, with 10% empty captions for
   classifier-free guidance (and :class:`CaptionWords`, so the motion words survive), on SD1.5's noise schedule with v-prediction (``--prediction_type``;
   SD1.5 itself predicts epsilon). The schedule and prediction type travel in the checkpoint, so
   the trainer and the sampler use them too.

The result is one LDM single-file checkpoint, ``<output_dir>/base.safetensors``, that carries its
own model configs in its metadata, so ``load_sd15`` and the CLI load it with no extra flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lookback_core.atomic import write_text
from lookback_core.latents import encode_latents
from lookback_core.ldm_export import save_ldm_checkpoint
from lookback_core.sd15 import SHIPPED_CONFIG_DIR
from toyworld import world
from training.args import at_least, check_number_flags

logger = logging.getLogger("lookback.toy_base")

# 32 norm groups everywhere, as SD1.5 has and as ComfyUI's UNet and VAE build them
# (GroupNorm(32, ...) is fixed in its code): a model with other group counts would load there
# without an error and compute something else, so the toy's widths are multiples of 32. Few
# channels per group cost some reconstruction (a GroupNorm before the output conv normalises each
# group over the whole image, so a flat background's level survives only between the channels of
# a group; measured on the first toy VAE at 1500 steps: 1 channel a group 27.4 dB, 4 a group 28.6).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=world.SIZE,
)
TEXT_HIDDEN = 64
UNET_CONFIG = dict(
    sample_size=world.SIZE // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=2,  # diffusers' name for the number of heads (SD1.5 configs use it so)
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
TEXT_OVERRIDES = dict(
    hidden_size=TEXT_HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    projection_dim=64,
)
EVAL_FRAMES = 128  # held-out frames for the VAE's PSNR
NUMBER_RULES = {
    **{
        flag: at_least(1)
        for flag in ("train_clips", "vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size")
    },
    **{flag: (lambda v: v > 0, "> 0") for flag in ("vae_learning_rate", "unet_learning_rate")},
    "text_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toyworld.base_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_clips", type=int, default=2000, help="clips (seeds 0..N-1) frames are drawn from")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch_size", type=int, default=8)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--unet_steps", type=int, default=1500)
    p.add_argument("--unet_batch_size", type=int, default=64)
    p.add_argument("--unet_learning_rate", type=float, default=5e-4)
    p.add_argument("--text_dropout", type=float, default=0.1)
    p.add_argument(
        "--word_loss_weight", type=float, default=0.1,
        help="weight of the loss that keeps every caption word readable from the text output (see CaptionWords)",
    )  # fmt: skip
    p.add_argument(
        "--prediction_type", default="v_prediction", choices=("epsilon", "v_prediction"),
        help="what the UNet predicts (stored in the checkpoint's scheduler config)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_number_flags(parser, args, NUMBER_RULES)
    return args


def scheduler_config(args: argparse.Namespace) -> dict:
    """SD1.5's noise schedule with the chosen prediction type."""
    config = json.loads((SHIPPED_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    return {**config, "prediction_type": args.prediction_type}


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """``[n, h, w, 3]`` uint8 to ``[n, 3, h, w]`` float in ``[-1, 1]``."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in ``[-1, 1]``, measured on 8-bit values as an image file would hold them."""
    quantise = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = F.mse_loss(quantise(reconstruction), quantise(target)).item()
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def cosine_lr(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FramePool:
    """Every frame of the training clips with its caption, drawn in seeded random batches."""

    def __init__(self, clips: int, seed: int) -> None:
        made = [world.make_clip(s) for s in tqdm(range(clips), desc="drawing clips", unit="clip")]
        self.frames = np.concatenate([c.frames for c in made])
        self.captions = [c.caption for c in made for _ in range(world.FRAMES)]
        self.words = {c.caption: (c.colour, c.shape, c.direction) for c in made}
        self.rng = np.random.default_rng(seed)

    def batches(self, size: int) -> Iterator[np.ndarray]:
        while True:
            yield self.rng.integers(len(self.frames), size=size)


def held_out_psnr(vae: AutoencoderKL) -> float:
    """The VAE's reconstruction PSNR (dB) of ``EVAL_FRAMES`` held-out frames, from the posterior mean."""
    held_out = to_pixels(
        np.stack(
            [world.make_clip(world.HELD_OUT_SEED + i).frames[i % world.FRAMES] for i in range(EVAL_FRAMES)]
        )
    )
    with torch.no_grad():
        return psnr(vae.decode(vae.encode(held_out).latent_dist.mean).sample, held_out)


def fit_reconstruction(
    vae: AutoencoderKL, params: list[torch.nn.Parameter], pool: FramePool, steps: int, batch_size: int,
    learning_rate: float, desc: str,
) -> None:  # fmt: skip
    """Train ``params`` of ``vae`` to reconstruct the pool's frames from the posterior mean (MSE),
    at a cosine-decayed rate; leaves ``vae`` in eval mode."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = cosine_lr(optimizer, steps)
    batches = pool.batches(batch_size)
    vae.train()
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        x = to_pixels(pool.frames[next(batches)])
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()


def train_vae(args: argparse.Namespace, pool: FramePool) -> tuple[AutoencoderKL, dict]:
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    fit_reconstruction(
        vae, list(vae.parameters()), pool, args.vae_steps, args.vae_batch_size, args.vae_learning_rate, "VAE"
    )
    reconstruction_psnr = held_out_psnr(vae)
    with torch.no_grad():
        sample = vae.encode(to_pixels(pool.frames[: 64 * world.FRAMES : world.FRAMES // 2])).latent_dist.mean
    scaling_factor = float(1 / sample.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    facts = {"vae_psnr_db": round(reconstruction_psnr, 2), "vae_scaling_factor": round(scaling_factor, 5)}
    logger.info(
        "VAE: held-out reconstruction %.2f dB, scaling factor %.4f", reconstruction_psnr, scaling_factor
    )
    return vae, facts


def encode_pool(vae: AutoencoderKL, pool: FramePool, batch: int = 256) -> torch.Tensor:
    """Scaled latents of every frame of the pool."""
    return torch.cat(
        [
            encode_latents(vae, to_pixels(pool.frames[i : i + batch]))
            for i in tqdm(range(0, len(pool.frames), batch), desc="encoding frames", unit="batch")
        ]
    )


class CaptionWords:
    """Keeps every caption word recoverable from the text tower's output.

    A frame shows a clip's colour and shape but not its direction, so the denoising loss alone
    teaches the text tower to drop the motion words (measured: "moving left" and "moving right"
    came out 99.95% alike). CLIP's text features, learned contrastively from captions of whole
    scenes, keep such words apart; here a linear head that must read colour, shape and direction
    back from the pooled text output does the same. The head is discarded after training.
    """

    def __init__(self, captions: list[str], words: dict[str, tuple[str, str, str]]) -> None:
        self.vocabularies = (list(world.COLOURS), list(world.SHAPES), list(world.DIRECTIONS))
        self.labels = torch.tensor(
            [[vocab.index(word) for vocab, word in zip(self.vocabularies, words[c])] for c in captions]
        )
        self.head = torch.nn.Linear(TEXT_HIDDEN, sum(len(v) for v in self.vocabularies))

    def loss(self, pooled: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        if not len(caption_ids):
            return pooled.sum() * 0
        logits = self.head(pooled).split([len(v) for v in self.vocabularies], dim=-1)
        labels = self.labels[caption_ids]
        return sum(F.cross_entropy(logit, labels[:, i]) for i, logit in enumerate(logits))

    @torch.no_grad()
    def accuracy(self, text_encoder: CLIPTextModel, token_ids: torch.Tensor) -> dict[str, float]:
        """Share of captions whose colour, shape and direction the head reads back."""
        logits = self.head(text_encoder(token_ids[: len(self.labels)]).pooler_output)
        predicted = torch.stack(
            [x.argmax(-1) for x in logits.split([len(v) for v in self.vocabularies], -1)], 1
        )
        correct = (predicted == self.labels).float().mean(0)
        return {
            f"text_{name}_accuracy": round(float(v), 3)
            for name, v in zip(("colour", "shape", "direction"), correct)
        }


def train_text_to_image(
    args: argparse.Namespace, pool: FramePool, latents: torch.Tensor
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_config = json.loads((SHIPPED_CONFIG_DIR / "text_encoder" / "config.json").read_text())
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_config, **TEXT_OVERRIDES}))
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_CONFIG_DIR / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_config(scheduler_config(args))
    captions = sorted(set(pool.captions))
    token_ids = tokenizer(
        captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([captions.index(c) for c in pool.captions])
    empty = len(captions)
    words = CaptionWords(captions, pool.words)
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(words.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_learning_rate, weight_decay=1e-2)
    schedule = cosine_lr(optimizer, args.unet_steps)
    generator = torch.Generator().manual_seed(args.seed + 2)
    batches = pool.batches(args.unet_batch_size)
    unet.train()
    text_encoder.train()
    losses = []
    bar = tqdm(range(args.unet_steps), desc="UNet + text", unit="step")
    for _ in bar:
        index = torch.from_numpy(next(batches))
        z = latents[index]
        ids = caption_index[index]
        ids = torch.where(torch.rand(len(ids), generator=generator) < args.text_dropout, empty, ids)
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=generator)
        encoded = text_encoder(token_ids[ids])
        prediction = unet(scheduler.add_noise(z, noise, t), t, encoded.last_hidden_state).sample
        target = noise if args.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
        loss = F.mse_loss(prediction, target)
        kept = ids != empty
        loss = loss + args.word_loss_weight * words.loss(encoded.pooler_output[kept], ids[kept])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    facts = {
        "unet_final_loss": round(float(np.mean(losses[-100:])), 4),
        **words.accuracy(text_encoder, token_ids),
    }
    return unet.eval(), text_encoder.eval(), facts


FACTS_FILE = "base_facts.json"


def read_stage_facts(path: Path, required: Iterable[str]) -> dict | None:
    """A toy-build stage's facts file (written last, so it says the stage is done) when it is
    complete: a JSON object with every ``required`` key. Otherwise None, and the stage is done
    again: missing (a kill between the stage's model file and its facts), cut short or damaged."""
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # a decoding error is a ValueError
        return None
    if not isinstance(facts, dict) or any(name not in facts for name in required):
        return None
    return facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pool = FramePool(args.train_clips, args.seed)
    vae, vae_facts = train_vae(args, pool)
    vae_seconds = time.time() - started
    unet, text_encoder, unet_facts = train_text_to_image(args, pool, encode_pool(vae, pool))
    facts = {
        **vars(args),
        **vae_facts,
        **unet_facts,
        "vae_seconds": round(vae_seconds),
        "seconds": round(time.time() - started),
    }
    path = save_ldm_checkpoint(
        output_dir / "base.safetensors",
        unet,
        vae,
        text_encoder,
        embed_configs=True,
        scheduler_config=scheduler_config(args),
        metadata={"toy_base": json.dumps(facts, sort_keys=True)},
    )
    # last, and atomically: the stage counts as done only with its complete facts (toyworld.build)
    write_text(output_dir / FACTS_FILE, json.dumps(facts, indent=2))
    print(f"toy base checkpoint: {path} ({json.dumps(vae_facts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
