"""LPIPS, the perceptual distance of Low-Fidelity Selection (LPIPS inside the mask) and of IC-LPIPS.

The `lpips` package's model (AlexNet by default, as the IC-LPIPS papers use). Its backbone weights download
on first use; offline, `pretrained_backbone=False` gives a random backbone (tests and labelled offline runs only),
and a failed download says where to put the weights."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from defectfill.errors import SynthesisError
from defectfill.images import to_signed_tensor


class LpipsModel:
    """The `lpips` package's LPIPS (AlexNet by default, as the IC-LPIPS papers use). `distance` gives the
    standard per-pair LPIPS; `masked_scores` averages the spatial LPIPS map over a mask ("LPIPS inside the
    mask" is the paper's phrase for Low-Fidelity Selection; the spatial map averaged over the mask is our
    reading of it). `pretrained_backbone=False` is a random backbone: tests and offline runs only."""

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", pretrained_backbone: bool = True):
        import lpips

        try:
            self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False).to(device).eval()
        except Exception as error:  # the torchvision backbone download failed
            raise SynthesisError(
                f"LPIPS needs the torchvision '{net}' backbone weights, which could not be loaded ({error}). Put the "
                f"checkpoint file in $TORCH_HOME/hub/checkpoints (run once with network access), or use --num_candidates 1"
            ) from error
        self.device = device

    @torch.no_grad()
    def distance_map(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) LPIPS map of paired batches in [-1, 1] (the `lpips` package's spatial output)."""
        self.model.spatial = True
        try:
            return self.model(a.to(self.device), b.to(self.device))
        finally:
            self.model.spatial = False

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) LPIPS of paired batches in [-1, 1], as the `lpips` package reports it."""
        return self.model(a.to(self.device), b.to(self.device)).flatten().cpu()

    def masked_scores(self, clean: Image.Image, candidates: list[Image.Image], mask: Image.Image) -> list[float]:
        """Per candidate, the LPIPS map against `clean` averaged over the mask's pixels."""
        batch = torch.stack([to_signed_tensor(c) for c in candidates])
        distance = self.distance_map(batch, to_signed_tensor(clean)[None].expand_as(batch))
        weights = torch.from_numpy(np.asarray(mask) > 0).float().to(distance.device)
        return ((distance[:, 0] * weights).sum(dim=(1, 2)) / weights.sum().clamp_min(1)).tolist()
