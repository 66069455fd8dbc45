#!/usr/bin/env python
"""Optimizer-state bytes of DefectFill's LoRA on the real SD2-inpainting shape, with AdamW and with
bitsandbytes' AdamW8bit (`--use_8bit_adam`), measured after one step (random weights, no download).

    python bench/optimizer_state.py                 # ranks 8 and 64; prints a markdown table

bitsandbytes keeps tensors under 4096 elements in 32 bits (`min_8bit_size`), so at small ranks many LoRA
matrices do not shrink: this measures how much does, rather than assuming the 4x.
"""

from __future__ import annotations

import argparse
import datetime

import torch
from common import PRESETS, build_components

from defectfill.models import Models, add_lora_adapters


def state_bytes(optimizer) -> tuple[int, int, int]:
    """(bytes of every optimizer-state tensor, parameters with an 8-bit state, parameters in all)."""
    total, eight_bit = 0, 0
    for state in optimizer.state.values():
        tensors = [v for v in state.values() if torch.is_tensor(v)]
        total += sum(t.numel() * t.element_size() for t in tensors)
        eight_bit += any(t.dtype == torch.uint8 for t in tensors)
    return total, eight_bit, len(optimizer.state)


def measure(rank: int, use_8bit: bool, components) -> dict:
    tokenizer, text_encoder, vae, unet, scheduler = components
    models = Models(tokenizer, text_encoder, vae, unet, scheduler)
    for model in (unet, text_encoder):  # a fresh adapter for each measurement
        for name in list(getattr(model, "peft_config", None) or {}):
            model.delete_adapters([name]) if hasattr(model, "delete_adapters") else model.delete_adapter(name)
    add_lora_adapters(models, rank, 2 * rank)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
        p.grad = torch.randn_like(p) * 1e-3
    if use_8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.step()
    total, eight_bit, count = state_bytes(optimizer)
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"rank": rank, "optimizer": "AdamW8bit" if use_8bit else "AdamW", "state_bytes": total, "eight_bit": eight_bit,
            "params": count, "lora_bytes": lora_bytes}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks to measure (alpha = 2 x rank).")
    args = parser.parse_args(argv)
    components = build_components(PRESETS["sd2"], torch.device("cpu"))
    rows = [measure(rank, use_8bit, components) for rank in args.ranks for use_8bit in (False, True)]
    print(f"# bench/optimizer_state.py ({datetime.date.today()}): SD2-inpainting shape, LoRA on UNet + text encoder")
    print("| rank | optimizer | LoRA params (MB) | optimizer state (MB) | tensors with 8-bit state | ratio to AdamW |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        baseline = next(r for r in rows if r["rank"] == row["rank"] and r["optimizer"] == "AdamW")
        print(f"| {row['rank']} | {row['optimizer']} | {row['lora_bytes'] / 2**20:.1f} | {row['state_bytes'] / 2**20:.1f} | "
              f"{row['eight_bit']} of {row['params']} | {row['state_bytes'] / baseline['state_bytes']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
