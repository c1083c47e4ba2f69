"""Prompts to text-encoder states, as SD1.5 (77 tokens) and as ComfyUI (any length, in windows)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer


def utf8_problem(text: str) -> str | None:
    """Why ``text`` is not valid UTF-8 (Python passes undecodable bytes of a command line on as
    lone surrogates, which no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("utf-8", "surrogateescape")
        return f"is not valid UTF-8 text (byte {bad!r} at character {err.start}); write it in UTF-8"
    return None


def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompts: Sequence[str],
    device: torch.device | str,
    grad: bool = False,
) -> torch.Tensor:
    """Encode prompts the SD1.5 way: pad/truncate to 77 tokens, return the last hidden state ``[n, 77, dim]``
    (with ``grad``, differentiable: a text encoder in training)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"encode_prompt needs a non-empty list of prompts, got {prompts!r}")
    max_length = text_encoder.config.max_position_embeddings
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.set_grad_enabled(grad):
        return text_encoder(ids.to(device)).last_hidden_state


def encode_long_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, device: torch.device | str
) -> tuple[torch.Tensor, int]:
    """Encode a prompt of any length as ComfyUI does: ``[1, 77 * k, dim]`` and its token count.

    The prompt's tokens are cut into windows of 75, each encoded as its own 77-token sequence
    (start token, the window, end token, padding), and the results are joined along the
    sequence; nothing is dropped. A prompt of up to 75 tokens gives exactly
    :func:`encode_prompt`'s ``[1, 77, dim]``."""
    length = text_encoder.config.max_position_embeddings
    window = length - 2
    # verbose=False: no warning that the ids exceed the model's length; they are windowed below
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    pieces = [ids[i : i + window] for i in range(0, len(ids), window)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = [
        [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (window - len(piece))
        for piece in pieces
    ]
    with torch.no_grad():
        hidden = text_encoder(torch.tensor(batch, device=device)).last_hidden_state
    return hidden.reshape(1, -1, hidden.shape[-1]), len(ids)


def match_token_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat 77-token windows so a long and a short prompt can share a batch, as ComfyUI does."""
    if a.shape[1] == b.shape[1]:
        return a, b
    length = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, length // a.shape[1], 1), b.repeat(1, length // b.shape[1], 1)
