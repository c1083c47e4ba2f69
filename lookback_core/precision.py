"""Precision names as every front end spells them (``--dtype``, the loader's ``precision``,
accelerate's ``mixed_precision``), and the torch dtypes they mean."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_named(name: str, *, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype called ``name`` (``fp32``, ``fp16``, ``bf16``); other names give ``default`` if one is
    given (accelerate's ``no``), else a ``ValueError`` listing the names."""
    if name in DTYPES:
        return DTYPES[name]
    if default is not None:
        return default
    raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(DTYPES)}")
