"""What a training run writes while it trains: resumable checkpoints and the deployable files.

:class:`AveragedWeights` puts the EMA's weights into the model for a while (the weights as deployed:
saved, exported and validated with them); :class:`RunSaver` writes a checkpoint (accelerate's state,
the run's RNG, the EMA and the weights file, committed atomically by :mod:`training.checkpoints`)
and the deployable files in the output folder: ``lookback_weights.safetensors`` and, with
``--train_backbone``, the checkpoint with the trained UNet (and text encoder).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from lookback_core.ldm_export import replace_unet
from lookback_core.temporal_unet import LookBackUNet
from lookback_core.weights import save_temporal_weights
from training import checkpoints
from training.args import recommended_sampler

logger = logging.getLogger("lookback.train")


class AveragedWeights:
    """The EMA of the trained parameters (``--use_ema``), or nothing to swap in without it."""

    def __init__(self, trained: list[nn.Parameter], decay: float | None, device: torch.device) -> None:
        self.trained = trained
        self.ema = EMAModel(trained, decay=decay) if decay is not None else None
        if self.ema is not None:
            self.ema.to(device)

    def step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.trained)

    @contextlib.contextmanager
    def in_model(self) -> Iterator[None]:
        """The EMA's weights in the model for the duration (the trained ones without --use_ema)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trained)
        self.ema.copy_to(self.trained)
        try:
            yield
        finally:
            self.ema.restore(self.trained)


class RunSaver:
    """Checkpoints under ``output_dir/checkpoint-<step>`` and the deployable files in ``output_dir``.

    ``facts`` are the training facts every weights file records (``steps`` is added per file)."""

    def __init__(
        self,
        args,
        accelerator: Accelerator,
        lookback: LookBackUNet,
        text_encoder: nn.Module,
        averaged: AveragedWeights,
        rng: torch.Generator,
        facts: dict,
    ) -> None:
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.accelerator = accelerator
        self.lookback = lookback
        self.text_encoder = text_encoder
        self.averaged = averaged
        self.rng = rng
        self.facts = facts
        self.exported_step: int | None = None

    def checkpoint(self, step: int) -> None:
        """A resumable checkpoint of every process's state, then the deployable files (main process)."""
        accelerator = self.accelerator
        tmp = checkpoints.temporary_dir(self.output_dir, step)
        if accelerator.is_main_process:
            checkpoints.begin(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        checkpoints.save_rng(tmp, accelerator.process_index, self.rng)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.averaged.ema is not None:
                checkpoints.save_ema(tmp, self.averaged.ema)
            with self.averaged.in_model():
                self.write_weights(tmp / checkpoints.WEIGHTS_NAME, step)
            final = checkpoints.commit(tmp, {"global_step": step}, self.args.checkpoints_total_limit)
            self.export(step)
            logger.info("saved %s", final)
        accelerator.wait_for_everyone()

    def export(self, step: int) -> None:
        """The deployable files in ``output_dir``: with --train_backbone the checkpoint, then the weights,
        last, so weights that record a step mean every file of that step is written."""
        with self.averaged.in_model():
            if self.args.train_backbone:
                replace_unet(
                    self.args.pretrained_model, self.lookback.unet, self.output_dir / checkpoints.BACKBONE_NAME,
                    self.text_encoder if self.args.train_text_encoder else None,
                )  # fmt: skip
            self.write_weights(self.output_dir / checkpoints.WEIGHTS_NAME, step)
        self.exported_step = step

    def finish(self, step: int) -> None:
        """After the last step: a resumed run that found the last checkpoint already written still
        rewrites the deployable files (a kill between that checkpoint and their rewrite must not
        leave older files in place)."""
        if self.accelerator.is_main_process and self.exported_step != step:
            self.export(step)

    def write_weights(self, path: Path, step: int) -> Path:
        return save_temporal_weights(
            path,
            self.lookback.temporal,
            training={**self.facts, "steps": step},
            recommended_sampler=recommended_sampler(self.args),
            horizon_frames=self.args.horizon_frames,
            context_frames=self.args.context_frames,
        )
