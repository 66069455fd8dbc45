"""Whether the app can score candidates (Low-Fidelity Selection) without reaching the network: the LPIPS backbone
is a torchvision checkpoint that torchvision downloads on first use. With the Hub offline (`HF_HUB_OFFLINE`), the
app looks for it in the local torch hub cache only and, when it is not there, turns selection off at start-up,
saying so on the page, instead of trying a download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

# The torchvision weights `lpips` loads for each --lpips_net (torchvision's pretrained=True).
BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def offline(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the Hub is switched off (`HF_HUB_OFFLINE`, as huggingface_hub reads it): nothing is downloaded."""
    return environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def backbone_file(net: str) -> Path:
    """Where torchvision keeps the LPIPS backbone's checkpoint: $TORCH_HOME/hub/checkpoints/<its file name>."""
    import torch
    import torchvision

    weights = getattr(torchvision.models, BACKBONE_WEIGHTS[net]).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def offline_without_backbone(net: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why selection is off before anything is tried (offline, and the checkpoint is not in the cache), else None."""
    if not offline(environ) or net not in BACKBONE_WEIGHTS:
        return None
    name = backbone_file(net).name
    if backbone_file(net).is_file():
        return None
    return (f"the LPIPS '{net}' backbone weights ({name}) are not in the local torch hub cache "
            "($TORCH_HOME/hub/checkpoints), and HF_HUB_OFFLINE is set, so nothing is downloaded")
