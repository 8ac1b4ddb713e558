"""The downstream network: PGL's encoder, a light U-Net decoder with a skip from every encoder stage, a 1x1x1 head,
and beside the decoder the dense probe's linear read-out of the encoder's feature maps.

Sizes and strides are ``(x, y, z)``, slice axis last (see :mod:`pgl_bundle.views`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetBasicBlock, UnetOutBlock, UpSample
from pgl_bundle.networks.encoder import PGLResNetEncoder
from pgl_bundle.networks.probe import DenseProbeHead
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SLIDING_WINDOW", "DecoderStage", "PGLSegmentationNet"]

# How every evaluation applies the network to a whole volume: validation during fine-tuning, configs/evaluate.json and
# configs/inference.json read these (keys sw_roi_size, sw_overlap, sw_batch_size, sw_mode), so test Dice is measured
# the way users get their masks. Chosen on validation cases: docs/benchmarks.md, "Sliding window".
SLIDING_WINDOW = {"roi_size": [112, 112, 32], "overlap": 0.25, "sw_batch_size": 4, "mode": "gaussian"}


class DecoderStage(nn.Module):
    """Upsample by ``scale``, add the skip projected to the stage's width, then (optionally) two 3x3x3 convolutions.

    The skip is projected by a 1x1x1 convolution and added, not concatenated: the encoder's skips are 2-8x wider than
    a light decoder (a bottleneck ResNet's first stage gives 4 x 64 channels at half resolution), and a 3x3x3
    convolution over the concatenation cost most of a step (docs/benchmarks.md, section 7). MONAI's ``UnetUpBlock`` /
    ``UnetrUpBlock`` concatenate and ``UpCat`` upsamples by 2 on every axis; the encoder's strides are anisotropic,
    so this stage composes MONAI blocks (``UpSample``, ``Convolution``, ``UnetBasicBlock``) with both free.

    Args:
        in_channels: channels of the deeper input.
        skip_channels: channels of the skip connection.
        out_channels: output channels.
        scale: upsampling factor per axis ``(x, y, z)`` (a transposed convolution with ``kernel = stride = scale``).
        norm: normalisation of the convolutions, as MONAI names it.
        dropout: dropout rate of the convolution block.
        conv_block: whether the sum goes through two 3x3x3 convolutions (``UnetBasicBlock``); without them the stage
            is linear upsampling plus the skip, what the last, full-resolution stage of a light decoder needs.

    Shapes: ``(B, in_channels, *s)`` and ``(B, skip_channels, *(s * scale)) -> (B, out_channels, *(s * scale))``.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        scale: Sequence[int],
        norm: str | tuple = "instance",
        dropout: float = 0.0,
        conv_block: bool = True,
    ) -> None:
        super().__init__()
        self.upsample = UpSample(3, in_channels, out_channels, scale_factor=tuple(scale), mode="deconv")
        self.skip = Convolution(3, skip_channels, out_channels, kernel_size=1, norm=norm, act="leakyrelu")
        self.block = (
            UnetBasicBlock(3, out_channels, out_channels, kernel_size=3, stride=1, norm_name=norm, dropout=dropout)
            if conv_block
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.upsample(x) + self.skip(skip))


class PGLSegmentationNet(nn.Module):
    """3D encoder-decoder for segmentation whose encoder is PGL's :class:`PGLResNetEncoder`.

    The encoder is the module pretraining trains, kept as the attribute ``encoder``, so a pretrained encoder checkpoint
    loads one to one: ``net.encoder.load_state_dict(torch.load("models/pretrained_encoder.pt"))`` (with checks and a
    report: :func:`pgl_bundle.transfer.load_pretrained_encoder`). The decoder is new: one :class:`DecoderStage` per
    encoder feature map, deepest first, each undoing that stage's stride and taking the next shallower map as its
    skip; the last stage undoes the stem's stride and takes the input image itself as its skip.

    Args:
        encoder: a :class:`PGLResNetEncoder`, built with the pretraining config's arguments.
        out_channels: number of classes, background included.
        decoder_channels: output channels of the decoder stages, deepest first; one more than the encoder's feature
            maps (5 stages for the stem and four ResNet stages).
        norm: normalisation of the decoder (the encoder keeps its own).
        dropout: dropout rate of the decoder and the head (MONAI Label's epistemic scoring sets it).
        full_resolution_block: whether the last, full-resolution stage has its two 3x3x3 convolutions. Off by
            default: at full resolution they cost as much as the whole encoder (docs/benchmarks.md, section 7);
            like MONAI's ``UNet``, whose last level is a transposed convolution, the last stage then only upsamples
            and adds the image.
        linear_head: add the dense probe's linear read-out of the encoder's maps to the logits, and start the
            decoder's output convolution at zero (see above).

    The linear head (``linear_head=True``) is :class:`~pgl_bundle.networks.DenseProbeHead`, the dense probe's
    per-voxel linear classifier on all five feature maps; its logits are added to the decoder's. The decoder's
    output convolution then starts at zero, so the untrained decoder adds nothing: the network starts as a linear
    read-out of the encoder's features, and after training only the linear head (the encoder and decoder frozen)
    it computes exactly what the dense probe computes with the same weights. Fine-tuning from there (linear probe,
    then fine-tune: :mod:`pgl_bundle.finetuning`) starts from what the probe already reads out.

    ``freeze_encoder_batchnorm``: when set (by :class:`pgl_bundle.finetuning.TransferHandler`), the encoder's
    batch-norm layers stay in eval mode (running statistics unchanged) whatever ``train()`` is called with; MONAI's
    ``SupervisedTrainer`` calls ``network.train()`` every iteration.

    Input ``(B, C, x, y, z)`` with sizes divisible by ``encoder.output_stride`` ((16, 16, 8) by default); output: logits
    ``(B, out_channels, x, y, z)``.
    """

    def __init__(
        self,
        encoder: PGLResNetEncoder,
        out_channels: int,
        decoder_channels: Sequence[int] = (64, 32, 16, 16, 16),
        norm: str | tuple = "instance",
        dropout: float = 0.0,
        full_resolution_block: bool = False,
        linear_head: bool = True,
    ) -> None:
        super().__init__()
        skip_channels = (encoder.conv1.in_channels, *encoder.out_channels[:-1])
        if len(decoder_channels) != len(skip_channels):
            raise ValueError(
                f"decoder_channels needs {len(skip_channels)} entries (one per encoder feature map), "
                f"got {list(decoder_channels)}."
            )
        self.encoder = encoder
        in_channels = (encoder.out_channels[-1], *decoder_channels[:-1])
        stage_skips = skip_channels[::-1]  # deepest first, like the decoder
        scales = encoder.stage_strides[::-1]  # each decoder stage undoes one encoder stride
        blocks = [True] * (len(scales) - 1) + [full_resolution_block]
        self.decoder = nn.ModuleList(
            DecoderStage(c_in, c_skip, c_out, scale, norm=norm, dropout=dropout, conv_block=block)
            for c_in, c_skip, c_out, scale, block in zip(in_channels, stage_skips, decoder_channels, scales, blocks)
        )
        self.head = UnetOutBlock(3, decoder_channels[-1], out_channels, dropout=dropout)
        self.linear_head = DenseProbeHead(encoder, out_channels) if linear_head else None
        if linear_head:
            nn.init.zeros_(self.head.conv.conv.weight)
            nn.init.zeros_(self.head.conv.conv.bias)
        self.freeze_encoder_batchnorm = False

    def train(self, mode: bool = True) -> PGLSegmentationNet:
        super().train(mode)
        if self.freeze_encoder_batchnorm:
            for module in self.encoder.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        skips = [x] + features[:-1]
        y = features[-1]
        for i, stage in enumerate(self.decoder):
            y = stage(y, skips[len(skips) - 1 - i])
        logits = self.head(y)
        if self.linear_head is not None:
            logits = logits + self.linear_head(features, x.shape[2:])
        return logits
