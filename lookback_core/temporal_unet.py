"""A diffusers SD1.5 UNet with look-back modules attached at its sites.

The modules are applied by forward hooks on the site modules, so the UNet's own weights and
state-dict keys stay untouched and :meth:`LookBackUNet.detach` gives the plain UNet back. The
number of frames reaches the hooks from :meth:`LookBackUNet.forward`'s input shape, never from
the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LookBackConfig
from .lookback import LookBackModule
from .sites import find_sites, site_channels, site_problems


def _key(site: str) -> str:
    return site.replace(".", "_")


class TemporalModules(nn.Module):
    """The look-back modules of every configured site; state-dict keys are ``<site>.<param>``."""

    def __init__(self, config: LookBackConfig) -> None:
        super().__init__()
        if set(config.channels) != set(config.sites):
            raise ValueError("LookBackConfig.channels must give the channels of every site")
        self.config = config
        self.blocks = nn.ModuleDict(
            {_key(site): LookBackModule(config.channels[site], config) for site in config.sites}
        )

    def __getitem__(self, site: str) -> LookBackModule:
        return self.blocks[_key(site)]

    def items(self) -> Iterator[tuple[str, LookBackModule]]:
        for site in self.config.sites:
            yield site, self[site]

    def site_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters keyed ``<site>.<name>`` (e.g. ``output.5.lookback.weight``)."""
        return {
            f"{site}.{name}": tensor
            for site, module in self.items()
            for name, tensor in module.state_dict().items()
        }

    def load_site_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for site, module in self.items():
            prefix = f"{site}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


class LookBackUNet(nn.Module):
    """UNet2DConditionModel + look-back modules; input and output are ``[b, c, f, h, w]``.

    With ``temporal=None`` it is the base UNet alone, run on every frame independently: the
    baseline that shows what the look-back modules add (the sampler still pins frame 0).
    """

    def __init__(self, unet: nn.Module, temporal: TemporalModules | None) -> None:
        super().__init__()
        self.unet = unet
        self.temporal = temporal
        self.num_frames: int | None = None
        self.checkpoint_sites: set[str] = set()
        self._handles = []
        if temporal is None:
            return
        sites = find_sites(unet)
        problems = site_problems(
            {name: module.channels for name, module in temporal.items()},
            {name: site.channels for name, site in sites.items()},
            "its look-back module",
        )
        if problems:
            raise ValueError("; ".join(problems))
        for name in temporal.config.sites:
            site = sites[name]
            self._handles.append(site.module.register_forward_hook(self._hook(name, site.returns_tuple)))

    @property
    def config(self) -> LookBackConfig | None:
        """The modules' config; ``None`` for the base UNet alone."""
        return None if self.temporal is None else self.temporal.config

    def _hook(self, name: str, returns_tuple: bool):
        def apply(_module: nn.Module, _args: Any, output: Any) -> Any:
            if self.num_frames is None:
                raise RuntimeError(
                    "the look-back UNet was called without a frame count; call LookBackUNet "
                    "with a [b, c, f, h, w] sample instead of the bare UNet"
                )
            hidden = output[0] if returns_tuple else output
            module = self.temporal[name]
            if name in self.checkpoint_sites and torch.is_grad_enabled():
                hidden = checkpoint(module, hidden, self.num_frames, use_reentrant=False)
            else:
                hidden = module(hidden, self.num_frames)
            return (hidden, *output[1:]) if returns_tuple else hidden

        return apply

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """Predict noise for a batch of clips.

        ``sample``: ``[b, c, f, h, w]``; ``timestep``: a number, ``[b]`` or ``[b, f]`` (one per
        frame); ``encoder_hidden_states``: ``[b, tokens, dim]``, shared by the frames of a
        sample. Returns ``[b, c, f, h, w]``.
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be [b, c, f, h, w], got shape {tuple(sample.shape)}")
        b, _, f, _, _ = sample.shape
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            t = repeat(t, "b -> b f", f=f)
        if t.shape != (b, f):
            raise ValueError(f"timestep must be a number, [b] or [b, f]; got shape {tuple(t.shape)}")
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, sample has {b}"
            )
        # Kept after the call: gradient checkpointing recomputes site modules during backward.
        self.num_frames = f
        out = self.unet(
            rearrange(sample, "b c f h w -> (b f) c h w"),
            rearrange(t, "b f -> (b f)"),
            repeat(encoder_hidden_states, "b s d -> (b f) s d", f=f),
            return_dict=False,
            **unet_kwargs,
        )[0]
        return rearrange(out, "(b f) c h w -> b c f h w", b=b)

    def detach(self) -> nn.Module:
        """Remove the hooks and return the plain UNet, unchanged."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.unet


def create_lookback_unet(unet: nn.Module, config: LookBackConfig) -> LookBackUNet:
    """Attach freshly initialised (identity) look-back modules to ``unet``."""
    config = config.with_channels(site_channels(unet))
    param = next(unet.parameters())
    temporal = TemporalModules(config).to(device=param.device, dtype=param.dtype)
    return LookBackUNet(unet, temporal)


def temporal_parameter_count(unet: nn.Module, config: LookBackConfig) -> int:
    """Parameters of the look-back modules ``config`` would attach to ``unet``, counted without
    allocating them (on the meta device)."""
    return module_parameter_count(config.with_channels(site_channels(unet)))


def module_parameter_count(config: LookBackConfig) -> int:
    """Parameters of the look-back modules of ``config`` (its channels given, as a weights file's
    header gives them), counted on the meta device: the trained ones, not fixed buffers such as
    temporal attention's positional encodings, which a weights file also holds."""
    with torch.device("meta"):
        return sum(p.numel() for p in TemporalModules(config).parameters())
