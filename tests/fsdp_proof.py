"""What can be proven of sharded training on CPUs with this torch, where accelerate will not run
FSDP (docs/training.md#several-processes): torch's own FSDP2 (``fully_shard``) shards the
look-back UNet one temporal site at a time (then the rest at the root), trains it on gloo
processes exactly as one process trains the same global batch, and its parameters, gathered
whole, make the same weights file (``lookback_core.weights``). Run by ``tests/test_training_fsdp.py``:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_proof.py --checkpoint C --config_dir D --out O
    python tests/fsdp_proof.py --checkpoint C --config_dir D --out O     # one process: the reference

Each process of the sharded run takes its half of a batch of 4 (with its own noise); the single
process takes both halves, each with the same noise, and averages them, as FSDP2 averages the
gradients. Writes ``<out>/weights.safetensors`` and ``<out>/run.json`` (the loss per step, and
for each site how many of its parameters each process held).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookback_core.config import preset  # noqa: E402
from lookback_core.sd15 import load_sd15  # noqa: E402
from lookback_core.temporal_unet import create_lookback_unet  # noqa: E402
from lookback_core.weights import save_temporal_weights  # noqa: E402
from training.objective import lookback_loss  # noqa: E402

BATCH, HALVES = 4, 2


def build(checkpoint: str, config_dir: str):
    components = load_sd15(checkpoint, config_dir=config_dir)
    torch.manual_seed(0)
    model = create_lookback_unet(components.unet, preset("light"))
    with torch.no_grad():  # modules away from their zero start, so every weight moves
        for p in model.temporal.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    model.unet.requires_grad_(False)
    return components, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--stop_after", type=int, default=None, help="sharded: save the shards after this step, stop"
    )
    parser.add_argument("--resume", default=None, help="sharded: a --stop_after run's --out, to go on from")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    components, model = build(args.checkpoint, args.config_dir)
    held = {}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for site, module in model.temporal.items():  # the wrapping policy: one unit per site
            fully_shard(module, mesh=mesh)
            held[site] = sum(p.to_local().numel() for p in module.parameters())
        fully_shard(model, mesh=mesh)  # the frozen UNet and the rest, at the root
    channels = components.unet.config.in_channels
    context = components.unet.config.cross_attention_dim
    latents = torch.randn(BATCH, channels, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    text = torch.randn(BATCH, 77, context, generator=torch.Generator().manual_seed(2))
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    share = BATCH // HALVES
    losses, first = [], 0
    if args.resume:
        first, losses = _load_shards(Path(args.resume), rank, model, optimizer)
    for step in range(first, args.steps):
        halves = [rank] if world > 1 else range(HALVES)
        total = torch.zeros(())
        for half in halves:
            part = slice(half * share, (half + 1) * share)
            noise = torch.Generator().manual_seed(1000 * step + half)
            loss = lookback_loss(model, latents[part], text[part], scheduler, noise) / len(halves)
            loss.backward()  # FSDP2 averages the gradients over the processes
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        if step + 1 == args.stop_after:
            _save_shards(Path(args.out), rank, model, optimizer, step + 1, losses)
            dist.destroy_process_group()
            return
    if world > 1:
        # Each parameter gathered whole (a collective: every process). Not torch's
        # get_model_state_dict: it runs the modules' state-dict hook, which reshapes the look-back
        # weights into the conv layout (lookback_core.lookback) and cannot flatten a shard.
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:  # into an unsharded model: the file as the trainer writes it
            _, model = build(args.checkpoint, args.config_dir)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(full[name])
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_temporal_weights(out / "weights.safetensors", model)
        (out / "run.json").write_text(json.dumps({"losses": losses, "world": world, "held": held}))
    if world > 1:
        report = [None] * world
        dist.all_gather_object(report, held)
        if rank == 0:
            (Path(args.out) / "run.json").write_text(
                json.dumps({"losses": losses, "world": world, "held": report})
            )
        dist.destroy_process_group()


def _save_shards(out: Path, rank: int, model, optimizer, steps: int, losses: list[float]) -> None:
    """A sharded checkpoint as a trainer could write it: each process its own part of every trained
    weight and of its AdamW state, in a safetensors file of its own."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"weight/{name}"] = p.to_local().detach().clone()
            for key, value in optimizer.state[p].items():
                local = value.to_local() if hasattr(value, "to_local") else value
                tensors[f"adam/{key}/{name}"] = local.detach().clone().reshape(local.shape)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / f"shard-{rank}.safetensors")
    (out / f"state-{rank}.json").write_text(json.dumps({"steps": steps, "losses": losses}))


def _load_shards(folder: Path, rank: int, model, optimizer) -> tuple[int, list[float]]:
    """This process's part of :func:`_save_shards`'s checkpoint, into the freshly sharded model and
    its optimiser; returns the steps done and their losses."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    tensors = load_file(folder / f"shard-{rank}.safetensors")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            p.to_local().copy_(tensors[f"weight/{name}"])
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                local = tensors[f"adam/{key}/{name}"]
                state[key] = (
                    local
                    if key == "step"
                    else DTensor.from_local(
                        local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
                )
            optimizer.state[p] = state
    saved = json.loads((folder / f"state-{rank}.json").read_text())
    return saved["steps"], saved["losses"]


if __name__ == "__main__":
    main()
