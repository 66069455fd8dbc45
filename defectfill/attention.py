"""Capture of the [V*] token's decoder cross-attention maps for DefectFill's attention loss (paper Eq. 6).

Two parts, after Attend-and-Excite's AttentionStore but keyed by layer and explicit about when it
records:

- `VStarAttentionStore` owns the maps. While `recording(...)` is active, each decoder cross-attention
  layer stores, for the chosen batch rows, the softmaxed attention probabilities of the [V*] token's
  columns (a weighted sum over its sub-token columns), averaged over heads. `aggregate` resizes each
  layer's map to the latent size and averages layers: (B, 1, h, w), *not detached*, so the attention
  loss trains the LoRA weights that produced the maps.
- `VStarCrossAttnProcessor` replaces the processor of each ``up_blocks.*.attn2`` layer. When the store
  is not recording it calls the processor it replaced (SDPA, or xformers), so the defect branch,
  inference and every other layer keep the fast path. When recording, it computes
  softmax(Q K^T * scale) explicitly (in fp32 under mixed precision) to read the probabilities.

PEFT LoRA on ``to_q/to_k/to_v/to_out.0`` acts on the captured layers, because the processor calls the
(LoRA-wrapped) projections of the `Attention` module it is given.

Gradient checkpointing recomputes the forward during backward, so the store must still be recording
during ``backward()`` (the recomputation has to take the same code path); a layer that already has a
map for this step keeps the first one, so recomputation neither records twice nor replaces the map that
is part of the loss graph. Call `reset()` after the backward pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

DECODER_PREFIX = "up_blocks."
CROSS_ATTENTION_SUFFIX = ".attn2"


def is_decoder_cross_attention(module_name: str) -> bool:
    """``up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2``: the layers the paper's loss reads."""
    return module_name.startswith(DECODER_PREFIX) and module_name.endswith(CROSS_ATTENTION_SUFFIX)


def token_piece_ids(tokenizer, token: str) -> list[int]:
    """The tokenizer ids of `token` without special tokens; a token split into several pieces gives several."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"token {token!r} tokenizes to nothing")
    return list(ids)


def token_weights(input_ids: torch.Tensor, piece_ids: list[int]) -> torch.Tensor:
    """(B, K) weights over the K text positions: 1/n on each of the n positions that hold the token's
    pieces (every occurrence of the whole piece sequence), 0 elsewhere, so a weighted sum of attention
    columns is the average over the token's pieces."""
    batch, length = input_ids.shape
    pieces = torch.tensor(piece_ids, device=input_ids.device)
    n = len(piece_ids)
    windows = input_ids.unfold(1, n, 1)  # (B, K - n + 1, n)
    starts = (windows == pieces).all(dim=-1)
    weights = torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
    for offset in range(n):
        weights[:, offset : offset + starts.shape[1]] += starts.float()
    found = weights.sum(dim=1, keepdim=True)
    if (found == 0).any():
        rows = (found[:, 0] == 0).nonzero().flatten().tolist()
        raise ValueError(f"the [V*] token pieces {piece_ids} do not occur in prompt row(s) {rows}")
    return weights / found


def layer_spatial_size(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h', w') of a UNet level whose attention sees `num_tokens` positions: each level halves the
    latent size, rounding up (stride-2 convolutions with padding 1)."""
    height, width = latent_size
    for _ in range(8):
        if height * width == num_tokens:
            return height, width
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    raise ValueError(f"cannot place {num_tokens} attention positions on a latent of size {latent_size}")


class VStarAttentionStore:
    """Holds the [V*] maps of one training step, keyed by layer name."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.enabled = False
        self.weights: torch.Tensor | None = None
        self.rows: slice = slice(None)
        self.latent_size: tuple[int, int] | None = None

    def start(self, weights: torch.Tensor, latent_size: tuple[int, int], rows: slice = slice(None)) -> None:
        """Record from now on: `weights` (B_rec, K) from `token_weights`, for batch rows `rows` of the UNet call."""
        self.reset()
        self.enabled, self.weights, self.rows, self.latent_size = True, weights, rows, tuple(latent_size)

    def reset(self) -> None:
        """Stop recording and drop the maps (call after backward)."""
        self.maps = {}
        self.enabled, self.weights, self.rows, self.latent_size = False, None, slice(None), None

    @contextmanager
    def recording(self, weights: torch.Tensor, latent_size: tuple[int, int], rows: slice = slice(None)) -> Iterator["VStarAttentionStore"]:
        self.start(weights, latent_size, rows)
        try:
            yield self
        finally:
            self.reset()

    def record(self, layer_name: str, probabilities: torch.Tensor) -> None:
        """`probabilities`: (B, heads, N, K) softmaxed cross-attention of one layer. Keeps the first map of
        a layer per step (a gradient-checkpointing recomputation does not replace it). The map is computed
        either way: the recomputation must save the same tensors as the original forward."""
        rows = probabilities[self.rows]
        weights = self.weights.to(device=rows.device, dtype=rows.dtype)
        if weights.shape[0] != rows.shape[0] or weights.shape[1] != rows.shape[-1]:
            raise ValueError(
                f"token weights of shape {tuple(weights.shape)} do not match the recorded rows of {layer_name} "
                f"(batch {rows.shape[0]}, {rows.shape[-1]} text positions)"
            )
        per_head = torch.einsum("bhnk,bk->bhn", rows, weights)
        height, width = layer_spatial_size(per_head.shape[-1], self.latent_size)
        self.maps.setdefault(layer_name, per_head.mean(dim=1).reshape(-1, 1, height, width))

    def aggregate(self) -> torch.Tensor:
        """A^[V*]: every recorded layer's map resized (bilinear) to the latent size, averaged over layers: (B, 1, h, w).
        The paper says "resized"; bilinear (rather than nearest) is our choice, so coarse layers give smooth maps."""
        if not self.maps:
            raise RuntimeError("no [V*] attention map was recorded: is the processor installed and the store recording?")
        resized = [
            F.interpolate(m, size=self.latent_size, mode="bilinear", align_corners=False) if m.shape[-2:] != self.latent_size else m
            for m in self.maps.values()
        ]
        return torch.stack(resized).mean(dim=0)


class StepAveragingStore(VStarAttentionStore):
    """A store for denoising (synthesis): each layer's map is averaged over every UNet call made while
    recording, one call per denoising step (the training store keeps a layer's first map of a step, for the
    loss). Maps are detached: synthesis only shows them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        super().reset()
        self.calls = {}

    def record(self, layer_name: str, probabilities: torch.Tensor) -> None:
        total = self.maps.pop(layer_name, None)
        super().record(layer_name, probabilities)
        current = self.maps[layer_name].detach().float()
        self.maps[layer_name] = current if total is None else total + current
        self.calls[layer_name] = self.calls.get(layer_name, 0) + 1

    def aggregate(self) -> torch.Tensor:
        self.maps = {name: total / self.calls[name] for name, total in self.maps.items()}
        self.calls = {name: 1 for name in self.maps}
        return super().aggregate()


class VStarCrossAttnProcessor:
    """Decoder cross-attention processor that records the [V*] map while its store is recording and
    otherwise delegates to the processor it replaced."""

    def __init__(self, store: VStarAttentionStore, layer_name: str, fallback: Callable) -> None:
        self.store = store
        self.layer_name = layer_name
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.store.enabled or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.recording_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def recording_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None):
        # Same steps as diffusers' AttnProcessor2_0, with the attention product written out.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Softmax in fp32 so the recorded maps and the loss on them are not fp16-quantised.
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probabilities = scores.softmax(dim=-1)
        self.store.record(self.layer_name, probabilities)
        hidden_states = torch.matmul(probabilities.to(value.dtype), value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def decoder_cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in unet.named_modules() if is_decoder_cross_attention(name) and hasattr(module, "set_processor")}


def install_vstar_capture(unet, store: VStarAttentionStore) -> list[str]:
    """Put a recording processor on every decoder cross-attention layer (wrapping the processor each
    had: SDPA or xformers); returns the layer names. Other layers are untouched."""
    modules = decoder_cross_attention_modules(unet)
    if not modules:
        raise ValueError("the UNet has no decoder cross-attention layers (up_blocks.*.attn2) to record [V*] maps from")
    for name, module in modules.items():
        processor = module.processor
        fallback = processor.fallback if isinstance(processor, VStarCrossAttnProcessor) else processor
        module.set_processor(VStarCrossAttnProcessor(store, name, fallback))
    return list(modules)


def remove_vstar_capture(unet) -> None:
    """Give every captured layer back the processor it had before `install_vstar_capture`."""
    for module in decoder_cross_attention_modules(unet).values():
        if isinstance(module.processor, VStarCrossAttnProcessor):
            module.set_processor(module.processor.fallback)
