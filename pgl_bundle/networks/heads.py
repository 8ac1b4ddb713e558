"""Projector and predictor heads: PGL's 1x1x1 convolution heads and BYOL's pooled MLP heads."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["ConvProjectionHead", "MLPProjectionHead"]


class ConvProjectionHead(nn.Sequential):
    """PGL projector / predictor: Conv 1x1x1 -> BatchNorm -> ReLU -> Conv 1x1x1, no pooling.

    Acting voxel by voxel, it keeps the map spatial (and commutes with the aligner's resampling up to BatchNorm).

    Args:
        in_channels: input channels (2048 after a ResNet-50, 256 for the predictor).
        hidden_channels: width of the hidden layer (4096 in the paper).
        out_channels: embedding channels (256 in the paper).

    Shapes: ``(B, in_channels, x, y, z) -> (B, out_channels, x, y, z)``.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 4096, out_channels: int = 256) -> None:
        super().__init__(
            Convolution(3, in_channels, hidden_channels, kernel_size=1, act="relu", norm="batch", adn_ordering="NA"),
            Convolution(3, hidden_channels, out_channels, kernel_size=1, conv_only=True),
        )


class MLPProjectionHead(nn.Sequential):
    """BYOL projector / predictor: Linear -> BatchNorm -> ReLU -> Linear on global vectors.

    Given a feature map, it first averages it over space (the global pooling that PGL removes).

    Shapes: ``(B, in_channels[, x, y, z]) -> (B, out_channels)``.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 4096, out_channels: int = 256) -> None:
        super().__init__(
            nn.Linear(in_channels, hidden_channels),
            nn.BatchNorm1d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(2).mean(dim=2) if x.ndim > 2 else x)
