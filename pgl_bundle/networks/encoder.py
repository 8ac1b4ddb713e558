"""PGL's encoder: MONAI's 3D ResNet with an anisotropic stem, returning the feature map of every stage.

Sizes and strides are ``(x, y, z)``, slice axis last (see :mod:`pgl_bundle.views`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from monai.networks.nets import ResNet
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

__all__ = ["PGLResNetEncoder", "feature_center_offset"]


def feature_center_offset(stage_strides: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """Where the centre of a strided network's output voxel falls in the input, relative to the ideal grid.

    A stride-``s`` convolution with an odd kernel and ``padding = kernel // 2`` centres output voxel ``j`` on
    input voxel ``s * j``, not on the middle of the block ``[s * j, s * (j + 1))`` it "covers": an offset of
    ``(1 - s) / 2`` input voxels. Chained stages add their offsets, each scaled by the strides before it. So
    output voxel ``k`` of the whole network is centred at input coordinate ``(k + 0.5) * S + offset``.

    The aligner needs this: a flipped view's offset points the other way, which without correction
    misaligns flipped and unflipped views by ``2 * offset`` input voxels (15 voxels in-plane for ResNet-50).

    Args:
        stage_strides: per stage, its stride per axis, in the order the input meets them.

    Returns:
        the offset per axis, in input voxels.
    """
    offset, scale = [0.0] * len(stage_strides[0]), [1] * len(stage_strides[0])
    for strides in stage_strides:
        for axis, s in enumerate(strides):
            offset[axis] += (1 - s) / 2 * scale[axis]
            scale[axis] *= s
    return tuple(offset)


class PGLResNetEncoder(ResNet):
    """3D ResNet encoder with output stride ``stem_stride * 8``: (16, 16, 8) by default.

    A :class:`monai.networks.nets.ResNet` without max pooling and without the classifier, whose stem stride is
    ``(2, 2, 1)`` so the slice axis is downsampled half as much. Module names are MONAI's, so the weights load
    one to one into ``monai.networks.nets.ResNet(..., feed_forward=False)`` and into the downstream network.

    Args:
        layers: blocks per stage; ``(3, 4, 6, 3)`` with bottleneck blocks is ResNet-50. Smaller stages
            (e.g. ``(1, 1, 1, 1)``) keep the same strides for CPU experiments.
        block: ``"bottleneck"`` or ``"basic"``.
        block_inplanes: channel width of each stage (bottleneck outputs are 4x wider).
        in_channels: image channels.
        stem_kernel: kernel of the single stem convolution.
        stem_stride: stride of the stem; stages 2 to 4 add a stride of 2 on every axis.
        norm: normalisation layer, as MONAI names it.
        activation_checkpointing: keep only each stage's input during the forward pass and recompute the stage in
            the backward pass (``torch.utils.checkpoint``): less memory for activations, about one more forward pass
            of compute. Normalisation statistics are updated once per step, as without it.
        channels_last: store the convolution weights and run the stages in ``torch.channels_last_3d`` memory
            format, which cuDNN's 3D convolutions may run faster in (mainly with mixed precision).

    Neither option changes the weights, their names or the results beyond floating-point rounding.

    Input ``(B, in_channels, x, y, z)`` with sizes divisible by :attr:`output_stride`; output: a list of the
    stem and the four stage outputs; the last is ``(B, out_channels, x / 16, y / 16, z / 8)``.
    """

    __jit_unused_properties__ = ["output_stride", "feature_offset"]  # geometry for Python callers, not inference

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        block: str = "bottleneck",
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 1,
        stem_kernel: Sequence[int] = (7, 7, 3),
        stem_stride: Sequence[int] = (2, 2, 1),
        norm: str | tuple = "batch",
        activation_checkpointing: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            block=block,
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=tuple(stem_kernel),
            conv1_t_stride=tuple(stem_stride),
            no_max_pool=True,
            feed_forward=False,
            norm=norm,
        )
        del self.avgpool  # the paper's encoder keeps its feature maps spatial
        self.stage_strides = (tuple(stem_stride), (1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
        expansion = 4 if block == "bottleneck" else 1
        self.out_channels = (block_inplanes[0], *(c * expansion for c in block_inplanes))
        self.activation_checkpointing = activation_checkpointing
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    @property
    def output_stride(self) -> tuple[int, int, int]:
        """Input voxels per output voxel, per axis ``(x, y, z)``."""
        strides = torch.tensor(self.stage_strides).prod(dim=0)
        return tuple(int(s) for s in strides)

    @property
    def feature_offset(self) -> tuple[float, ...]:
        """See :func:`feature_center_offset`: ``(-7.5, -7.5, -3.5)`` for the default strides."""
        return feature_center_offset(self.stage_strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.act(self.bn1(self.conv1(x)))
        if not torch.jit.is_scripting() and self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return self._forward_checkpointed(x)  # a training option; TorchScript compiles only the path below
        features = [x]  # stage by stage: TorchScript cannot loop over a tuple of modules
        x = self.layer1(x)
        features.append(x)
        x = self.layer2(x)
        features.append(x)
        x = self.layer3(x)
        features.append(x)
        features.append(self.layer4(x))
        return features

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stages under ``torch.utils.checkpoint`` (see ``activation_checkpointing``); ``x``: the stem output."""
        features = [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = checkpoint(stage, x, use_reentrant=False, context_fn=functools.partial(_recompute_contexts, stage))
            features.append(x)
        return features


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """``torch.utils.checkpoint`` contexts: nothing around the forward pass; around the recomputation, restore the
    running statistics of ``module``'s normalisation layers, which the recomputation would otherwise update twice."""
    return contextlib.nullcontext(), _keep_norm_buffers(module)


@contextlib.contextmanager
def _keep_norm_buffers(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, _NormBase) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
