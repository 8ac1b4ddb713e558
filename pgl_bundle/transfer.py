"""Pretrained encoder -> downstream network: checked loading, export to MONAI's own ResNet backbones, freezing.

An encoder checkpoint (``models/pretrained_encoder.pt``, written by ``configs/pretrain.json`` for PGL and for BYOL) is
the plain ``state_dict`` of :class:`~pgl_bundle.networks.PGLResNetEncoder`. Its names are MONAI ``ResNet`` names, so it
loads one to one into :class:`~pgl_bundle.networks.PGLSegmentationNet` ``.encoder`` and, where shapes agree, into
``monai.networks.nets.ResNet`` and the ResNet backbones of ``FlexibleUNet``. Nothing here loads partially in silence:
every load reports matched, missing and unexpected keys, and refuses a file that does not fit.

Beside an encoder file lies its adaptation plan (``models/pretrained_encoder.json`` beside
``models/pretrained_encoder.pt``, as nnssl's checkpoints carry theirs): the encoder's arguments, the HU window, the
spacing and the patch it was pretrained with. Fine-tuning, evaluation, inference and the probe build their network
and preprocessing from it (:func:`adaptation_plan`), so the encoder file is the only thing a user passes; fine-tuning
writes the plan it used beside ``models/model.pt`` (``models/model.json``) for evaluation and inference.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping

import torch
from monai.handlers import CheckpointLoader
from monai.networks.nets import ResNet
from pgl_bundle.errors import BadInputError, require_file
from torch import nn

__all__ = [
    "PLAN_DEFAULTS",
    "adaptation_plan",
    "check_restored_model",
    "export_encoder",
    "load_encoder_checkpoint",
    "load_online_encoder",
    "load_pretrained_encoder",
    "plan_file",
    "read_plan",
    "write_plan",
]

logger = logging.getLogger(__name__)

_SHOWN = 5  # keys quoted in a message


def _quote(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _load(path: str, kind: str, article: str):
    """``torch.load`` of tensors and plain containers on the CPU; errors name the file and the ``kind`` expected."""
    require_file(path, kind)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated, foreign or unsafe pickles
        raise BadInputError(f"{path}: not {article} {kind}, torch.load failed: {e}") from e


def load_encoder_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an encoder checkpoint: a ``state_dict`` mapping parameter and buffer names to tensors, loaded on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says what its folder holds instead).
        ValueError: ``path`` is not a PyTorch file of tensors only, or holds something other than a ``state_dict``
            (e.g. a training checkpoint ``{"network": ..., "optimizer": ...}``); the message names the file.
    """
    path = os.fspath(path)
    state = _load(path, "encoder checkpoint", "an")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = _quote(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise BadInputError(
            f"{path}: not an encoder checkpoint: expected a state_dict of tensors (models/pretrained_encoder.pt of "
            f"configs/pretrain.json), found {found}."
        )
    return dict(state)


def _prefix_hint(source_keys, target_keys) -> str:
    """When the checkpoint's names are the encoder's behind a prefix (``online.encoder.``, ``module.``), say so."""
    prefixes = Counter(s[: -len(t)] for s in source_keys for t in target_keys if s.endswith("." + t))
    if not prefixes:
        return ""
    prefix = prefixes.most_common(1)[0][0]
    return (
        f" Its names are the encoder's behind the prefix '{prefix}': it holds a network that contains the encoder;"
        f" save that network's '{prefix.rstrip('.')}' state_dict instead."
    )


def _check_match(path: str, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> set[str]:
    """The names in both; raise when there are none or when any of their shapes differ."""
    matched = state.keys() & target.keys()
    if not matched:
        raise BadInputError(
            f"{path}: no tensor name matches the network's (checkpoint: {_quote(state)}; network: {_quote(target)})."
            + _prefix_hint(state.keys(), target.keys())
        )
    wrong = [k for k in sorted(matched) if state[k].shape != target[k].shape]
    if wrong:
        details = "; ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in wrong[:_SHOWN])
        raise BadInputError(
            f"{path}: {len(wrong)} tensor shape(s) differ from the network's (checkpoint vs network: {details}). "
            "Build the encoder with the pretraining arguments (encoder_layers, encoder_block, encoder_width)."
        )
    return matched


def load_pretrained_encoder(network: nn.Module, checkpoint: str | os.PathLike | None, strict: bool = True) -> nn.Module:
    """Load an encoder checkpoint into ``network.encoder`` and log what matched; an empty path keeps random weights.

    The config switch of ``configs/train.json``: ``"pretrained_encoder": ""`` (random initialisation) or the path of
    a PGL or BYOL ``pretrained_encoder.pt``.

    Args:
        network: a module with an ``encoder`` attribute (:class:`~pgl_bundle.networks.PGLSegmentationNet`).
        checkpoint: the encoder checkpoint; ``""`` or None: leave the network as it is.
        strict: also fail when a tensor of the encoder is missing from the checkpoint or one is left over. Either
            way, the report names them.

    Returns:
        ``network``, its encoder loaded.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_encoder_checkpoint`; also when no name matches, when a
            matched tensor's shape differs, or (``strict``) when names are missing or unexpected.
    """
    if not checkpoint:
        logger.info("pretrained_encoder is empty: the encoder keeps its random initialisation.")
        return network
    path = os.fspath(checkpoint)
    return _load_encoder_state(network, path, load_encoder_checkpoint(path), strict)


def load_online_encoder(
    network: nn.Module, checkpoint: str | os.PathLike, prefix: str = "online.encoder."
) -> nn.Module:
    """Load the online encoder out of a full pretraining checkpoint (``models/checkpoints/*.pt`` of
    ``configs/pretrain.json``: ``{"network": ..., "optimizer": ..., ...}``) into ``network.encoder``, strictly.

    The probe curve reads the encoder at every saved iteration this way; ``models/pretrained_encoder.pt`` holds the
    same tensors for the final iteration (:func:`load_pretrained_encoder`).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: it does not load, holds no ``network`` state with ``prefix`` names, or does not fit the encoder.
    """
    path = os.fspath(checkpoint)
    state = _load(path, "pretraining checkpoint", "a")
    network_state = state.get("network") if isinstance(state, Mapping) else None
    encoder = {k[len(prefix) :]: v for k, v in (network_state or {}).items() if k.startswith(prefix)}
    if not encoder:
        raise BadInputError(f"{path}: not a pretraining checkpoint: no 'network' entry with '{prefix}*' tensors.")
    return _load_encoder_state(network, path, encoder, strict=True)


def _load_encoder_state(network: nn.Module, path: str, state: Mapping[str, torch.Tensor], strict: bool) -> nn.Module:
    target = network.encoder.state_dict()
    matched = _check_match(path, state, target)
    missing, unexpected = target.keys() - state.keys(), state.keys() - target.keys()
    report = f"{len(matched)} of {len(target)} encoder tensors matched, missing: [{_quote(missing)}], "
    report += f"unexpected: [{_quote(unexpected)}]"
    if strict and (missing or unexpected):
        raise BadInputError(f"{path}: the checkpoint does not fit the encoder: {report}.")
    network.encoder.load_state_dict({k: state[k] for k in matched}, strict=False)
    (logger.warning if missing or unexpected else logger.info)(f"{path}: loaded into network.encoder: {report}.")
    return network


def export_encoder(
    checkpoint: str | os.PathLike, target: nn.Module, filepath: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Write an encoder checkpoint into the state of a MONAI network whose backbone is a ``monai.networks.nets.ResNet``.

    The backbone is found by type, so the names line up whatever it is called: ``ResNet`` itself (no prefix),
    ``FlexibleUNet`` with a ``resnet*`` backbone (``encoder.``), or :class:`~pgl_bundle.networks.PGLSegmentationNet`
    (``encoder.``). A tensor is taken when the backbone has one of that name and shape; the others are left out and
    reported, and the target keeps its own values there: e.g. ``conv1.weight`` for a stem kernel other than
    ``(7, 7, 3)``, and the shortcut convolutions' biases, which ``FlexibleUNet``'s backbones do not have. Example::

        from monai.networks.nets import FlexibleUNet, resnet50
        from pgl_bundle.transfer import export_encoder

        # exact: the same stem and no max pooling, so every tensor fits and the network computes the same features
        net = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_size=(7, 7, 3), conv1_t_stride=(2, 2, 1),
                       no_max_pool=True, feed_forward=False)
        net.load_state_dict(export_encoder("models/pretrained_encoder.pt", net))

        # FlexibleUNet: all but the stem kernel (7x7x7) and the shortcut biases; its strides are isotropic,
        # so its features differ from PGL's: a starting point for fine-tuning
        unet = FlexibleUNet(in_channels=1, out_channels=2, backbone="resnet50", spatial_dims=3)
        unet.load_state_dict(export_encoder("models/pretrained_encoder.pt", unet, "models/flexible_unet_init.pt"))

    Args:
        checkpoint: an encoder checkpoint (see :func:`load_encoder_checkpoint`).
        target: the MONAI network to initialise; it is not modified.
        filepath: where to also save the result with ``torch.save``; None: do not save.

    Returns:
        the complete ``state_dict`` of ``target`` with the fitting encoder tensors in place: it loads with
        ``target.load_state_dict(...)`` (strict).

    Raises:
        ValueError: ``target`` holds no ``ResNet``, or no tensor fits; and see :func:`load_encoder_checkpoint`.
    """
    path = os.fspath(checkpoint)
    state = load_encoder_checkpoint(path)
    backbone = next((name for name, m in target.named_modules() if isinstance(m, ResNet)), None)
    if backbone is None:
        raise ValueError(f"{type(target).__name__} holds no monai.networks.nets.ResNet to take the encoder of {path}.")
    prefix = f"{backbone}." if backbone else ""
    result = target.state_dict()
    fitting = [k for k in state if prefix + k in result and result[prefix + k].shape == state[k].shape]
    if not fitting:
        raise ValueError(f"{path}: no tensor fits the {type(target).__name__} backbone '{backbone}'.")
    result.update({prefix + k: state[k] for k in fitting})
    kept = [
        f"{k} {tuple(state[k].shape)} vs {tuple(result[prefix + k].shape)}" if prefix + k in result else k
        for k in state.keys() - set(fitting)
    ]
    logger.info(
        f"{path}: exported {len(fitting)} of {len(state)} encoder tensors to {type(target).__name__}"
        f" '{prefix}*'; left out: [{_quote(kept)}]."
    )
    if filepath is not None:
        torch.save(result, filepath)
    return result


# The settings a pretrained encoder fixes downstream, and their values when no plan says otherwise: those of
# configs/pretrain.json (the paper's ResNet-50 and the soft-tissue window, native spacing).
PLAN_DEFAULTS = {
    "encoder_layers": [3, 4, 6, 3],
    "encoder_block": "bottleneck",
    "encoder_width": [64, 128, 256, 512],
    "hu_window": [-200, 300],
    "pixdim": None,
}


def plan_file(weights: str | os.PathLike) -> str:
    """The adaptation plan of a weights file: the same path with ``.json`` for ``.pt``."""
    return os.path.splitext(os.fspath(weights))[0] + ".json"


def write_plan(weights: str | os.PathLike, plan: Mapping) -> str:
    """Write ``plan`` (the :data:`PLAN_DEFAULTS` keys, plus any record such as the pretraining ``patch_size``) beside
    ``weights``, atomically; return its path."""
    path = plan_file(weights)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.partial", "w") as f:
        json.dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()}, f, indent=1)
    os.replace(f"{path}.partial", path)
    return path


def read_plan(weights: str | os.PathLike) -> dict | None:
    """The plan beside ``weights``; None when there is none.

    Raises:
        BadInputError: the plan is not JSON or lacks one of the :data:`PLAN_DEFAULTS` keys (the message names it).
    """
    path = plan_file(weights)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            plan = json.load(f)
    except ValueError as e:
        raise BadInputError(f"{path}: not a readable adaptation plan (JSON): {e}.") from e
    missing = [k for k in PLAN_DEFAULTS if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise BadInputError(f"{path}: the adaptation plan lacks {missing}; write it again with write_plan.")
    return plan


def adaptation_plan(weights: str | os.PathLike | None, **given) -> dict:
    """The settings to build the network and preprocessing with: the plan beside ``weights``, where the config
    gives none; the given ones where there is no plan; :data:`PLAN_DEFAULTS` for the rest.

    Args:
        weights: an encoder file (``--pretrained_encoder``) or fine-tuned model (``models/model.pt``); ""/None:
            no plan.
        given: the config's values of :data:`PLAN_DEFAULTS` keys; None: not given.

    Raises:
        BadInputError: a given setting contradicts the plan (the message gives the plan's value); see also
            :func:`read_plan`.
    """
    unknown = set(given) - set(PLAN_DEFAULTS)
    if unknown:
        raise TypeError(f"adaptation_plan: unknown settings {sorted(unknown)}.")
    plan = read_plan(weights) if weights else None
    resolved = {}
    for key, default in PLAN_DEFAULTS.items():
        value = given.get(key)
        value = list(value) if isinstance(value, tuple) else value
        if plan is None:
            resolved[key] = default if value is None else value
        elif value is None or value == plan[key]:
            resolved[key] = plan[key]
        else:
            raise BadInputError(
                f"{weights}: --{key} {json.dumps(value)} contradicts the adaptation plan it was trained with "
                f"({plan_file(weights)}: {key} = {json.dumps(plan[key])}); leave --{key} out to use the plan's."
            )
    return resolved


def check_restored_model(network: nn.Module, handler) -> None:
    """Before any data is read: the weights a training run restores fit the network it built; stop if not.

    MONAI Label's ``BundleTrainTask`` prepends a ``CheckpointLoader`` for ``models/model.pt`` to ``train#handlers``
    and loads it non-strictly when the trainer starts, after the datasets are cached; configs/train.json builds the
    encoder from that model's plan (``restored_model``) and calls this with the first handler.

    Args:
        network: the network the run trains (``network_def``).
        handler: the first training handler; anything but a ``monai.handlers.CheckpointLoader`` passes.

    Raises:
        BadInputError: the checkpoint's tensor names or shapes differ from the network's (the message names the file,
            the first differences and the settings that decide them).
    """
    if not isinstance(handler, CheckpointLoader):
        return
    path = handler.load_path
    state = _load(path, "model checkpoint", "a")
    state = state.get("model", state) if isinstance(state, Mapping) else state
    target = network.state_dict()
    if not isinstance(state, Mapping):
        raise BadInputError(f"{path}: not a model checkpoint: expected a state_dict, found {type(state).__name__}.")
    missing, unexpected = target.keys() - state.keys(), state.keys() - target.keys()
    wrong = [k for k in sorted(target.keys() & state.keys()) if tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        shapes = "; ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in wrong[:_SHOWN])
        raise BadInputError(
            f"{path}: does not fit the network this run builds (missing: [{_quote(missing)}], unexpected: "
            f"[{_quote(unexpected)}], shapes, checkpoint vs network: [{shapes}]). The encoder comes from the "
            f"adaptation plan beside it ({plan_file(path)}), the rest from decoder_channels and label_names: they "
            "must be the ones it was trained with."
        )
