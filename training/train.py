"""Train look-back temporal modules on a frozen Stable Diffusion 1.5.

    python training/train.py --pretrained_model v1-5.safetensors --train_data_dir videos/ --output_dir runs/lb
    accelerate launch training/train.py ...          # multi-GPU / multi-node / DeepSpeed (not FSDP yet)

The model code is ``lookback_core``'s, the same as the CLI's and the nodes', so the weights file
written here (``<output_dir>/lookback_weights.safetensors``) loads everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

# Run as a script from a checkout: make the repository root (lookback_core, training) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lookback_core import atomic  # noqa: E402
from lookback_core.atomic import remove_stale_partials_under, sigterm_as_exit, write_text  # noqa: E402
from lookback_core.config import LookBackConfig  # noqa: E402
from lookback_core.latents import encode_latents, latent_scale  # noqa: E402
from lookback_core.memory import training_shortfall  # noqa: E402
from lookback_core.precision import dtype_named  # noqa: E402
from lookback_core.prompts import encode_prompt  # noqa: E402
from lookback_core.sd15 import SD15Components, load_sd15  # noqa: E402
from lookback_core.temporal_unet import LookBackUNet, create_lookback_unet, temporal_parameter_count  # noqa: E402
from lookback_core.weights import (  # noqa: E402
    TemporalWeightsError,
    load_lookback_unet,
    read_temporal_header,
)
from training import checkpoints, run_config  # noqa: E402
from training.args import build_parser, datasets, module_config, parse_args  # noqa: E402
from training.buckets import BucketBatchSampler, bucket_table  # noqa: E402
from training.cache import Encoders, LatentCache  # noqa: E402
from training.cache_step import clip_windows, fill_cache, open_cache  # noqa: E402
from training.data import VideoClipDataset, clip_items, collate  # noqa: E402
from training.dataset_config import DATASETS_NAME, DatasetSpec, resolved_toml  # noqa: E402
from training.objective import lookback_loss, timestep_weights  # noqa: E402
from training.saver import AveragedWeights, RunSaver  # noqa: E402
from training.validation import check_validation_inputs, run_validation  # noqa: E402

logger = logging.getLogger("lookback.train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class MetricsLog:
    """Loss, lr and throughput as JSON lines (always), and through accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path) -> None:
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.accelerator.log(values, step=step)


def _timestep_bias_facts(args) -> dict:
    """The timestep bias the weights were trained with, as the flags gave it."""
    facts = {"strategy": args.timestep_bias_strategy, "multiplier": args.timestep_bias_multiplier}
    if args.timestep_bias_strategy == "range":
        return facts | {"begin": args.timestep_bias_begin, "end": args.timestep_bias_end}
    return facts | {"portion": args.timestep_bias_portion}


def _make_optimizer(args, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over parameter groups ``{"params": ..., "lr": ...}``."""
    kwargs = dict(
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        except ImportError:
            logger.warning("--use_8bit_adam: bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW(groups, **kwargs)


def trackers(report_to: str) -> list[str]:
    """The accelerate trackers ``--report_to`` asks for, of those installed (wandb is checked
    up front: training.args; tensorboard, the default, falls back to the JSON lines alone)."""
    wanted = {"all": ["tensorboard", "wandb"], "none": []}.get(report_to, [report_to])
    return [name for name in wanted if importlib.util.find_spec(name) is not None]


def _encode_batch(batch: dict, components, cache: LatentCache | None, device, weight_dtype):
    """VAE latents ``[b, c, f, h, w]`` and caption embeddings (of the frozen text encoder), from the
    cache where possible (a batch from a complete cache holds them already)."""
    if "latents" in batch:
        return batch["latents"].to(device), batch["text"].to(device)
    latents, texts = [], []
    for pixels, caption, key in zip(batch["pixels"], batch["captions"], batch["keys"], strict=True):
        entry = cache.get(key) if cache is not None else None
        if entry is None:
            with torch.no_grad():
                z = encode_latents(components.vae, pixels.to(device, weight_dtype)).permute(1, 0, 2, 3)
                t = encode_prompt(components.tokenizer, components.text_encoder, [caption], device)[0]
            entry = {"latents": z.float(), "text": t.float()}
            if cache is not None:
                cache.put(key, entry)
        latents.append(entry["latents"].to(device))
        texts.append(entry["text"].to(device))
    return torch.stack(latents), torch.stack(texts)


def _save_only_trainable_weights(accelerator: Accelerator) -> None:
    """Keep the frozen SD1.5 UNet out of resumable checkpoints: they hold the temporal modules only."""

    def keep_temporal(models, weights, _output_dir) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.startswith("temporal.")}

    def load_temporal(models, input_dir) -> None:
        from safetensors.torch import load_file

        for i in range(len(models)):
            model = accelerator.unwrap_model(models.pop())
            suffix = f"_{i}" if i else ""
            state = load_file(Path(input_dir) / f"model{suffix}.safetensors")
            model.temporal.load_state_dict({k.removeprefix("temporal."): v for k, v in state.items()})

    accelerator.register_save_state_pre_hook(keep_temporal)
    accelerator.register_load_state_pre_hook(load_temporal)


def _describe(config: LookBackConfig) -> str:
    parts = [f"d={config.depth}", f"k={config.kernel}", f"at {len(config.sites)} sites"]
    parts += [name for name, on in (("without look-back conv", not config.lookback),
              ("without adapter", not config.adapter), ("with a causal adapter", config.causal_adapter),
              ("with the first-frame anchor", config.first_frame_anchor)) if on]  # fmt: skip
    return " ".join(parts)


def _module_source(args) -> str:
    if args.init_lookback_weights is not None:
        return f"--init_lookback_weights {args.init_lookback_weights}"
    return f"--preset {args.preset} and the ablation flags"


class ResumeError(ValueError):
    """The output folder's checkpoints cannot be continued as asked; the message says why and what to do."""


# Training facts a resumed run must share with its checkpoint: the weights record them for the whole run.
RESUMED_FACTS = (
    "objective",
    "timestep_bias",
    "motion_loss_weight",
    "frames",
    "stride",
    "resolution",
    "datasets",
    "train_backbone",
    "train_text_encoder",
)


def resume(
    args, accelerator: Accelerator, lookback, ema, rng: torch.Generator, output_dir: Path, facts: dict
) -> tuple[Path | None, int]:
    """Load the newest checkpoint that loads (``--resume_from_checkpoint latest``) or the one named;
    returns it and its step (``None, 0`` when there is none yet).

    A damaged checkpoint is skipped with a warning naming it and why, and the next older one is
    tried; a checkpoint of another preset, or trained otherwise (:data:`RESUMED_FACTS`, against
    this run's ``facts``), stops the run with both named."""
    if args.resume_from_checkpoint == "latest":
        candidates = checkpoints.complete_checkpoints(output_dir)[::-1]
    else:
        candidates = [checkpoints.find_checkpoint(output_dir, args.resume_from_checkpoint)]
    for candidate in candidates:
        try:
            header = read_temporal_header(candidate / checkpoints.WEIGHTS_NAME)
        except TemporalWeightsError as err:
            logger.warning("skipped %s: %s", candidate, err)
            continue
        stored, wanted = header.config, lookback.config
        differing = [k for k in RESUMED_FACTS if k in header.training and header.training[k] != facts.get(k)]
        if differing:
            raise ResumeError(
                f"{candidate} was trained with "
                + ", ".join(f"{k} {header.training[k]!r} (this run: {facts.get(k)!r})" for k in differing)
                + "; resume with the flags it was trained with, or start over in another --output_dir"
            )
        if replace(stored, channels={}) != replace(wanted, channels={}):
            raise ResumeError(
                f"{candidate} holds look-back modules {_describe(stored)}, but this run asks for "
                f"{_describe(wanted)} ({_module_source(args)}); resume with the flags it was trained with, "
                "or start over in another --output_dir"
            )
        # A damaged checkpoint fails in many ways (safetensors, torch.load, JSON, missing keys).
        try:
            accelerator.load_state(str(candidate))
            checkpoints.load_rng(candidate, accelerator.process_index, rng)
            if ema is not None:
                checkpoints.load_ema(candidate, ema)
            step = int(checkpoints.read_state(candidate)["global_step"])
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err)[:300]}"
            logger.warning("skipped %s: it cannot be loaded (%s)", candidate, reason)
            continue
        return candidate, step
    if candidates:
        raise ResumeError(
            f"none of the checkpoints in {output_dir} could be loaded ({', '.join(c.name for c in candidates)}; "
            "see the warnings above); move them away or pass --overwrite_output_dir to start over"
        )
    return None, 0


@dataclass
class Run:
    """What preparation hands the loop: the prepared model, data and optimiser, and what a step draws on."""

    accelerator: Accelerator
    model: nn.Module  # the LookBackUNet as accelerate prepared it (wrapped for several processes)
    lookback: LookBackUNet  # the same, unwrapped
    components: SD15Components
    dataset: VideoClipDataset
    batches: BucketBatchSampler  # every batch from one bucket; told each epoch
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[nn.Parameter]  # clipped together
    averaged: AveragedWeights
    # The generator behind noise, timesteps and text dropout, saved with every checkpoint. Kept
    # apart from the global RNG, which data loaders draw from whenever they start an epoch, so a
    # resumed run draws exactly what an uninterrupted one would have.
    rng: torch.Generator
    noise_scheduler: DDPMScheduler
    draw_weights: torch.Tensor | None  # the timestep bias (None: uniform)
    cache: LatentCache | None
    encoders: Encoders  # the VAE encoder and text encoder, or the cache step's entries (validation)
    empty_text: torch.Tensor  # the empty caption's embedding, for text dropout
    weight_dtype: torch.dtype
    facts: dict  # what the weights record about the training (training.saver.RunSaver)
    updates_per_epoch: int
    max_steps: int
    epochs: int


def _accelerator(args, output_dir: Path, log_with: list[str]) -> Accelerator:
    return Accelerator(
        # Several processes on a machine without CUDA (accelerate launch on CPUs): without cpu=True
        # accelerate would not join them (gloo) and every process would act as the only one.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _clear_output_dir(args, accelerator: Accelerator, output_dir: Path) -> None:
    """Remove what stopped runs left half-written (and, with --overwrite_output_dir and no resume, the
    earlier run's checkpoints); a folder that cannot be written is named now, not at the first save.
    Then refuse another run's checkpoints unless the run resumes them."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for leftover in checkpoints.remove_incomplete(output_dir):
            logger.warning("removed incomplete checkpoint %s (a run was stopped while saving it)", leftover)
        for folder in filter(None, (output_dir, args.cache_dir)):
            for leftover in remove_stale_partials_under(folder):
                logger.warning("removed %s (a file a stopped run was writing)", leftover)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for old in checkpoints.remove_run(output_dir):
                logger.warning("--overwrite_output_dir: removed %s of an earlier run", old)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    accelerator.wait_for_everyone()


def sharding_problem(distributed_type: DistributedType) -> str | None:
    """Why this trainer cannot run under ``distributed_type``, or None. Under FSDP every process holds
    a shard of each trained weight, and the weights file and the validation videos are made on the
    main process alone from the unwrapped model: it would write one shard (measured with torch's FSDP
    on 2 CPU processes, docs/training.md#several-processes), so an FSDP run is refused up front."""
    if distributed_type == DistributedType.FSDP:
        return (
            "FSDP (accelerate config distributed_type FSDP) is not supported yet: the weights file would hold "
            "only the main process's shard of each weight. Use DDP (training/accelerate_configs/ddp.yaml), "
            "--gradient_checkpointing all and --use_8bit_adam, or a smaller preset"
        )
    return None


def _refuse_another_run(args, output_dir: Path) -> None:
    earlier = checkpoints.complete_checkpoints(output_dir)
    if earlier and not args.resume_from_checkpoint:
        raise ResumeError(
            f"--output_dir {output_dir} holds another run's checkpoints ({', '.join(p.name for p in earlier)}); "
            "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete them and "
            "start over, or choose another --output_dir"
        )


def _build_model(
    args, components: SD15Components, device: torch.device, weight_dtype: torch.dtype
) -> LookBackUNet:
    """The look-back UNet to train (from --init_lookback_weights or the preset), with what trains
    switched on, the frozen parts in the mixed-precision dtype and gradient checkpointing as asked."""
    if args.init_lookback_weights is not None:
        model = load_lookback_unet(
            args.init_lookback_weights, components.unet, latent_scale=latent_scale(components.vae)
        )
    else:
        config = module_config(args)
        problem = training_shortfall(
            temporal_parameter_count(components.unet, config),
            device,
            "adamw_8bit" if args.use_8bit_adam else "adamw",
        )
        if problem:  # before anything is allocated
            raise ValueError(
                f"the look-back modules of {_module_source(args)} ({_describe(config)}): {problem}; "
                "choose a smaller --lookback_depth or preset"
            )
        model = create_lookback_unet(components.unet, config)
    components.vae.requires_grad_(False)
    if components.text_encoder is not None:  # None: the captions come from a complete cache
        components.text_encoder.requires_grad_(args.train_text_encoder)
    model.unet.requires_grad_(args.train_backbone)
    if weight_dtype != torch.float32:
        components.vae.to(dtype=weight_dtype)
        if components.text_encoder is not None and not args.train_text_encoder:
            components.text_encoder.to(dtype=weight_dtype)
        if not args.train_backbone:
            model.unet.to(dtype=weight_dtype)
    if args.gradient_checkpointing in ("unet", "all"):
        model.unet.enable_gradient_checkpointing()
    if args.gradient_checkpointing in ("sites", "all"):
        model.checkpoint_sites = set(model.config.sites)
    return model


def _learning_rates(args, batch_scale: int) -> dict[str, float]:
    """The rate of each trained part (``temporal``, and ``backbone``/``text_encoder`` when they train),
    scaled by the effective batch size with --scale_lr."""
    factor = batch_scale if args.scale_lr else 1
    rates = {"temporal": args.learning_rate * factor}
    if args.train_backbone:
        rates["backbone"] = (args.backbone_learning_rate or args.learning_rate) * factor
    if args.train_text_encoder:
        # at the backbone's rate unless given (the flag needs --train_backbone: training.args)
        given = args.text_encoder_learning_rate
        rates["text_encoder"] = given * factor if given is not None else rates["backbone"]
    return rates


def _data_facts(specs: list[DatasetSpec]) -> dict:
    """The data as the weights record it: the longest clip, the largest resolution and the stride
    (when the datasets share one), and with a dataset config every dataset."""
    strides = {spec.frame_stride for spec in specs}
    facts = {
        "frames": max(n for spec in specs for n in spec.num_frames),
        "resolution": max(r for spec in specs for r in spec.resolution),
        **({"stride": strides.pop()} if len(strides) == 1 else {}),
    }
    if len(specs) > 1 or specs[0].buckets:  # not the one square dataset of the data flags
        facts["datasets"] = [spec.recorded() for spec in specs]
    return facts


def _training_facts(
    args, accelerator: Accelerator, components: SD15Components, rates: dict[str, float], batch_scale: int,
    draw_weights: torch.Tensor | None, parser, specs: list[DatasetSpec],
) -> dict:  # fmt: skip
    """What the weights record about their training (and what a resumed run must share: RESUMED_FACTS)."""
    facts = {
        **_data_facts(specs),
        "preset": args.preset, "objective": args.objective, "learning_rate": rates["temporal"],
        "text_dropout": args.text_dropout,
        "base_checkpoint": Path(args.pretrained_model).name, "ema": bool(args.use_ema),
        "train_backbone": args.train_backbone, "train_text_encoder": args.train_text_encoder,
        "processes": accelerator.num_processes,
        "effective_batch_size": batch_scale,
        "timestep_bias": None if draw_weights is None else _timestep_bias_facts(args),  # None: uniform
        "motion_loss_weight": args.motion_loss_weight,
        # the base's facts a front end checks the weights against (lookback_core.weights.base_problems)
        "latent_scale": latent_scale(components.vae), "context_dim": components.unet.config.cross_attention_dim,
        "settings": run_config.recorded_settings(args, parser),  # every flag, paths by name only
    }  # fmt: skip
    if args.train_backbone:
        facts["backbone_learning_rate"] = rates["backbone"]  # not the optimiser's: 0 while warming up
    if args.train_text_encoder:
        facts["text_encoder_learning_rate"] = rates["text_encoder"]
    if args.init_lookback_weights is not None:  # the modules are the file's, not a preset's
        del facts["preset"]
        facts["init_lookback_weights"] = Path(args.init_lookback_weights).name
    return facts


def prepare(args, accelerator: Accelerator, parser) -> Run:
    """Everything the loop needs, every input checked before any training: the output folder
    cleared of stopped runs' leftovers, the data found, the model built and what trains set, the
    optimiser, schedule and EMA prepared by accelerate, the timestep bias and the latent cache."""
    output_dir = Path(args.output_dir)
    problem = sharding_problem(accelerator.distributed_type)
    if problem:
        raise ValueError(problem)
    _clear_output_dir(args, accelerator, output_dir)
    specs = datasets(args)
    items, left_out = clip_items(specs)
    for path, reason in left_out[:20]:
        logger.warning("left out %s: %s", path, reason)
    if len(left_out) > 20:
        logger.warning("left out %d more videos (%d in all)", len(left_out) - 20, len(left_out))
    weight_dtype = dtype_named(accelerator.mixed_precision, default=torch.float32)  # "no": fp32
    cache, settings, manifest = (
        open_cache(args, specs, weight_dtype) if args.cache_dir else (None, None, None)
    )
    if cache is not None and manifest is None:
        logger.info(
            "the cache %s holds no finished cache step of these settings (%s): clips are encoded as they come. "
            "Run the same command with --cache_only first to train without the VAE encoder and the text encoder",
            cache.folder, settings,
        )  # fmt: skip
    dataset = VideoClipDataset(
        items,
        seed=args.seed,
        windows=clip_windows(args),
        cache=cache,
        manifest=manifest and manifest["clips"],
    )
    logger.info("%d clips per epoch in %d buckets:\n%s", len(dataset), len(set(dataset.buckets)),
                bucket_table(dataset.buckets, args.train_batch_size))  # fmt: skip
    check_validation_inputs(args, accelerator.device)
    _refuse_another_run(args, output_dir)
    if accelerator.is_main_process:  # what reruns this run: python training/train.py --config <it>
        write_text(output_dir / run_config.RESOLVED_NAME, run_config.resolved_toml(args, parser))
        if args.dataset_config:
            write_text(output_dir / DATASETS_NAME, resolved_toml(specs))

    # a complete cache holds every clip's latents and caption: neither encoder is loaded (the text
    # encoder is, when it trains)
    components = load_sd15(
        args.pretrained_model, config_dir=args.config_dir, device=accelerator.device,
        vae_encoder=manifest is None, text_encoder=manifest is None or args.train_text_encoder,
    )  # fmt: skip
    if manifest is not None:
        logger.info("training from the cache step's clips in %s: the VAE encoder and text encoder are not loaded",
                    cache.folder)  # fmt: skip
    model = _build_model(args, components, accelerator.device, weight_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.train_text_encoder:
        trainable += [p for p in components.text_encoder.parameters() if p.requires_grad]
    rng = torch.Generator(accelerator.device).manual_seed(args.seed + accelerator.process_index)

    batches = BucketBatchSampler(dataset.buckets, args.train_batch_size, args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.dataloader_num_workers
    )
    # each process sees its share of the batches (accelerate's even_batches pads the last one)
    updates_per_epoch = math.ceil(
        math.ceil(len(loader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    batch_scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    rates = _learning_rates(args, batch_scale)
    groups = [{"params": list(model.temporal.parameters()), "lr": rates["temporal"]}]
    if args.train_backbone:
        groups.append({"params": list(model.unet.parameters()), "lr": rates["backbone"]})
    if args.train_text_encoder:
        groups.append({"params": list(components.text_encoder.parameters()), "lr": rates["text_encoder"]})
    optimizer = _make_optimizer(args, groups)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    if not args.train_backbone:
        _save_only_trainable_weights(accelerator)
    prepared, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if args.train_text_encoder:  # its weights then go into the resumable checkpoints too
        components.text_encoder = accelerator.prepare(components.text_encoder)
    if math.ceil(len(loader) / args.gradient_accumulation_steps) != updates_per_epoch:
        raise RuntimeError(f"{len(loader)} batches per process after sharding, expected {updates_per_epoch}")
    lookback = accelerator.unwrap_model(prepared)
    # the EMA follows every trained weight: the temporal modules and, with --train_backbone, the UNet
    # (and with --train_text_encoder the text encoder)
    trained = [p for p in lookback.parameters() if p.requires_grad]
    if args.train_text_encoder:
        trained += [
            p for p in accelerator.unwrap_model(components.text_encoder).parameters() if p.requires_grad
        ]
    averaged = AveragedWeights(trained, args.ema_decay if args.use_ema else None, accelerator.device)

    noise_scheduler = DDPMScheduler.from_config(components.scheduler_config)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if args.timestep_bias_end > num_timesteps:
        raise ValueError(
            f"--timestep_bias_end must be at most the base's {num_timesteps} training timesteps, got "
            f"{args.timestep_bias_end}"
        )
    draw_weights = timestep_weights(
        num_timesteps, args.timestep_bias_strategy, args.timestep_bias_multiplier,
        args.timestep_bias_portion, args.timestep_bias_begin, args.timestep_bias_end,
    )  # fmt: skip
    encoders = Encoders(components, cache)
    empty_text = encoders.prompts([""], accelerator.device)[0].float()
    facts = _training_facts(args, accelerator, components, rates, batch_scale, draw_weights, parser, specs)
    return Run(
        accelerator=accelerator, model=prepared, lookback=lookback, components=components, dataset=dataset,
        batches=batches, loader=loader, optimizer=optimizer, lr_scheduler=lr_scheduler, trainable=trainable, averaged=averaged,
        rng=rng, noise_scheduler=noise_scheduler, draw_weights=draw_weights, cache=cache, encoders=encoders,
        empty_text=empty_text,
        weight_dtype=weight_dtype, facts=facts, updates_per_epoch=updates_per_epoch, max_steps=max_steps,
        epochs=math.ceil(max_steps / updates_per_epoch),
    )  # fmt: skip


def _batch_loss(args, run: Run, batch: dict, step: int) -> torch.Tensor:
    """The look-back loss of one batch (``step``: the update it is for, named if the loss is not finite)."""
    device = run.accelerator.device
    latents, text = _encode_batch(batch, run.components, run.cache, device, run.weight_dtype)
    drop = torch.rand(len(text), device=text.device, generator=run.rng) < args.text_dropout
    # with --train_text_encoder the captions go through the encoder being trained ("" if dropped)
    if args.train_text_encoder:
        captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist(), strict=True)]
        text = encode_prompt(
            run.components.tokenizer, run.components.text_encoder, captions, device, grad=True
        )
    else:
        text = torch.where(drop[:, None, None], run.empty_text, text)
    with run.accelerator.autocast():
        loss = lookback_loss(
            run.model, latents, text.to(run.weight_dtype), run.noise_scheduler, run.rng, run.weight_dtype,
            args.objective, run.draw_weights, args.motion_loss_weight,
        )  # fmt: skip
    if not torch.isfinite(loss):
        raise NonFiniteLoss(
            f"the loss became {loss.item()} at step {step}; stopping. The last good "
            f"checkpoint is kept in {args.output_dir}; try a lower --learning_rate or fp32/bf16"
        )
    return loss


def _optimise(args, run: Run, loss: torch.Tensor) -> None:
    run.accelerator.backward(loss)
    if run.accelerator.sync_gradients and args.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _validate(args, run: Run, metrics: MetricsLog, step: int) -> None:
    """The validation videos of the weights as deployed (EMA-averaged), from the main process."""
    if args.validation_image and run.accelerator.is_main_process:
        run.model.eval()
        with run.averaged.in_model():
            result = run_validation(
                args, run.lookback, run.components, Path(args.output_dir) / "validation", step, run.encoders
            )
        run.model.train()
        metrics(step, result)


class SkippedSamples:
    """Unusable samples the loader skipped: each named once, counted every time."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, batch: dict) -> None:
        for path, reason in batch["skipped"]:
            if self.counts[path] == 0:
                logger.warning("skipped %s (%s)", path, reason)
            self.counts[path] += 1

    def total(self) -> int:
        return sum(self.counts.values())


def train(args) -> Path:
    output_dir = Path(args.output_dir)
    log_with = trackers(args.report_to)
    accelerator = _accelerator(args, output_dir, log_with)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.report_to != "none" and not log_with:
        logger.info("--report_to %s: no such tracker is installed; logging to JSONL only", args.report_to)
    set_seed(args.seed)
    parser = build_parser()  # the flags' groups, for the resolved config and the recorded settings
    run = prepare(args, accelerator, parser)
    text_encoder = accelerator.unwrap_model(run.components.text_encoder) if args.train_text_encoder else None
    saver = RunSaver(args, accelerator, run.lookback, text_encoder, run.averaged, run.rng, run.facts)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        found, global_step = resume(
            args, accelerator, run.lookback, run.averaged.ema, run.rng, output_dir, run.facts
        )
        if found is None:
            logger.info("no complete checkpoint in %s yet; starting from step 0", output_dir)
        else:
            first_epoch = global_step // run.updates_per_epoch
            skip_batches = (global_step % run.updates_per_epoch) * args.gradient_accumulation_steps
            logger.info("resumed from %s at step %d", found, global_step)

    metrics = MetricsLog(accelerator, output_dir / "logs" / "metrics.jsonl")
    if log_with:  # wandb's run folder beside tensorboard's, not in the folder the run was started from
        accelerator.init_trackers(
            "lookback",
            config={k: v for k, v in vars(args).items() if v is not None},
            init_kwargs={"wandb": {"dir": str(output_dir / "logs")}},
        )

    if args.validation_at_start and global_step == 0:
        _validate(args, run, metrics, 0)
    skipped = SkippedSamples()
    bar = tqdm(
        total=run.max_steps,
        initial=global_step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    started, samples_seen, frames_seen, loss_sum, loss_count = time.time(), 0, 0, 0.0, 0
    run.model.train()
    # a run resumed at its last step has nothing left to train (in mid-epoch the loop would take one more)
    for epoch in range(first_epoch, run.epochs if global_step < run.max_steps else first_epoch):
        run.dataset.set_epoch(epoch)
        run.batches.set_epoch(epoch)
        run.loader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(run.loader, skip_batches) if epoch == first_epoch else run.loader
        )
        for batch in batches:
            skipped.note(batch)
            with accelerator.accumulate(run.model):
                loss = _batch_loss(args, run, batch, global_step + 1)
                _optimise(args, run, loss)
            loss_sum, loss_count = loss_sum + loss.detach().item(), loss_count + 1
            samples_seen += len(batch["keys"]) * accelerator.num_processes
            frames_seen += batch["frames"] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            run.averaged.step()
            global_step += 1
            bar.update(1)
            elapsed = max(time.time() - started, 1e-9)
            values = {
                "loss": loss_sum / loss_count,
                "lr": run.lr_scheduler.get_last_lr()[0],
                "clips_per_s": samples_seen / elapsed,
                "frames_per_s": frames_seen / elapsed,
                "skipped_samples": skipped.total(),
            }
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            metrics(global_step, values)
            loss_sum, loss_count = 0.0, 0
            if global_step % args.checkpointing_steps == 0 or global_step == run.max_steps:
                saver.checkpoint(global_step)
            if global_step % args.validation_steps == 0:
                _validate(args, run, metrics, global_step)
            if global_step >= run.max_steps:
                break
        skip_batches = 0
        if global_step >= run.max_steps:
            break
    bar.close()
    if global_step >= run.max_steps:
        saver.finish(global_step)
    accelerator.wait_for_everyone()
    if skipped.counts:
        logger.warning("skipped %d unusable samples %d times in all", len(skipped.counts), skipped.total())
    accelerator.end_training()
    return output_dir / checkpoints.WEIGHTS_NAME


def describe_os_error(err: OSError) -> str:
    """An OSError in the user's words: which file, and for a full or read-only disk, what to do."""
    return atomic.describe_os_error(
        err, place="--output_dir / --cache_dir", then="resume with --resume_from_checkpoint latest"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_exit():  # a stopped run removes the files it was writing
            if args.cache_only:
                logging.basicConfig(
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                )
                manifest = fill_cache(args, _accelerator(args, Path(args.output_dir), []))
                print(f"cache manifest: {manifest}")
                return 0
            weights = train(args)
    except NonFiniteLoss as err:
        logger.error("%s", err)
        return 3
    except OSError as err:
        logger.error("%s", describe_os_error(err))
        return 2
    except ValueError as err:  # the user's inputs: data, CSV, checkpoints, resume, validation inputs
        logger.error("%s", err)
        return 2
    print(f"temporal weights: {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
