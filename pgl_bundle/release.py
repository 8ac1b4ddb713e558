"""Publishing the bundle: ``large_files.yml`` for the released weights, and the zip for ``monai.bundle download``.

    python -m pgl_bundle publish --base_url <release_url>
    python -m pgl_bundle pack --output dist/ct_pgl_ssl_segmentation_v0.1.0.zip

where ``<release_url>`` is e.g. ``https://github.com/OWNER/pgl-bundle/releases/download/v0.1.0``, to which the zip
and the weights are uploaded. Users then fetch both with MONAI's own commands (docs/production.md):

    python -m monai.bundle download --name ct_pgl_ssl_segmentation --bundle_dir . \
        --url <release_url>/ct_pgl_ssl_segmentation_v0.1.0.zip
    python -m monai.bundle download_large_files --bundle_path ct_pgl_ssl_segmentation

MONAI provides the downloading and the hash checks, not the packing: these two functions are what it lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile

import yaml
from pgl_bundle.errors import BadInputError
from pgl_bundle.transfer import read_plan

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_NAME",
    "METADATA_KEY",
    "WEIGHTS",
    "pack",
    "require_weights",
    "write_large_files",
]

# the zoo's pattern (modality, method, task); not the Python package's name: a download folder of that name in
# the working directory would shadow the installed package
BUNDLE_NAME = "ct_pgl_ssl_segmentation"
WEIGHTS = ("models/pretrained_encoder.pt", "models/model.pt")  # pretraining's encoder, fine-tuning's network
BUNDLE_FILES = ("configs", "docs", "pgl_bundle", "scripts", "large_files.yml", "LICENSE", "README.md", "pyproject.toml")
_LEFT_OUT = ("__pycache__", ".pyc", ".egg-info", ".pt")
METADATA_KEY = "pretrained_encoder"  # the encoder's plan and provenance in configs/metadata.json

logger = logging.getLogger(__name__)


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_weights(path: str) -> str:
    """``path`` if it is a file; else stop with one line saying how to get the weights, not a traceback.

    Inference starts here (configs/inference.json's ``checkpointloader``): a fresh download has no weights yet.

    Raises:
        SystemExit: ``path`` does not exist (the message names it and the two ways to get it).
    """
    if os.path.isfile(path):
        return path
    raise SystemExit(
        f"{path}: no trained weights. Train them (python -m monai.bundle run --config_file configs/train.json ...) "
        "or fetch the published ones (python -m monai.bundle download_large_files --bundle_path <bundle folder>)."
    )


def write_large_files(
    base_url: str, bundle_root: str = ".", output: str | None = None, metadata: str | None = None
) -> str:
    """Write the ``large_files.yml`` that ``download_large_files`` reads: each of :data:`WEIGHTS`, its URL and md5;
    and record the pretrained encoder's plan and provenance (:mod:`pgl_bundle.provenance`) in the bundle's metadata,
    under :data:`METADATA_KEY`, so that the released bundle says what its encoder was trained on.

    Args:
        base_url: where the weight files are published; a file's URL is ``base_url/<file name>``.
        bundle_root: the bundle whose ``models/`` holds the weights to publish.
        output: the file to write; default ``bundle_root/large_files.yml``.
        metadata: the metadata to record the encoder in; default ``bundle_root/configs/metadata.json``. Left as it
            is when it does not exist or the encoder has no plan (both are logged).

    Returns:
        the path written.

    Raises:
        FileNotFoundError: a weight file is missing (the message names it).
    """
    entries = []
    for path in WEIGHTS:
        local = os.path.join(bundle_root, path)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{local}: weights to publish not found; train them first (docs/production.md).")
        url = f"{base_url.rstrip('/')}/{os.path.basename(path)}"
        entries.append({"path": path, "url": url, "hash_val": _md5(local), "hash_type": "md5"})
    output = output or os.path.join(bundle_root, "large_files.yml")
    with open(output, "w") as f:
        f.write("# Weights of this bundle, fetched by `python -m monai.bundle download_large_files`.\n")
        f.write("# Written by `python -m pgl_bundle publish` for the published files.\n")
        yaml.safe_dump({"large_files": entries}, f, sort_keys=False)
    _record_encoder(
        os.path.join(bundle_root, WEIGHTS[0]), metadata or os.path.join(bundle_root, "configs", "metadata.json")
    )
    return output


def _record_encoder(encoder: str, metadata: str) -> None:
    """Put the plan of ``encoder`` into the bundle metadata file ``metadata``, atomically, as :data:`METADATA_KEY`."""
    plan = read_plan(encoder)
    if plan is None or not os.path.isfile(metadata):
        logger.warning(f"{metadata}: not updated: {'no plan beside ' + encoder if plan is None else 'no such file'}.")
        return
    with open(metadata) as f:
        content = json.load(f)
    content[METADATA_KEY] = {"path": WEIGHTS[0], **plan}
    with open(metadata + ".partial", "w") as f:
        json.dump(content, f, indent=4)
        f.write("\n")
    os.replace(metadata + ".partial", metadata)
    logger.info(f"{metadata}: {METADATA_KEY} recorded from {encoder}'s plan.")


def _require_published(large_files: str) -> None:
    """Stop unless every weight ``large_files`` lists has a hash: the placeholder shipped in the repository has
    none, and its URLs lead nowhere, so a zip (or model-zoo submission) with it cannot fetch weights; the zoo's CI
    stops at its first check, downloading them."""
    with open(large_files) as f:
        entries = (yaml.safe_load(f) or {}).get("large_files") or []
    unpublished = [entry.get("path") for entry in entries if not entry.get("hash_val")]
    if unpublished or not entries:
        raise BadInputError(
            f"{large_files}: weights {unpublished or 'none listed'} have no published URL and hash (the placeholder); "
            "run `python -m pgl_bundle publish --base_url <release_url>` with the trained weights in models/ first."
        )


def pack(output: str, bundle_root: str = ".", name: str = BUNDLE_NAME, large_files: str | None = None) -> str:
    """Zip the bundle as ``monai.bundle download`` expects: one top folder ``name`` holding the bundle, no weights.

    Args:
        output: the zip to write (by model-zoo convention ``<name>_v<version>.zip``).
        bundle_root: the bundle to pack; :data:`BUNDLE_FILES` are taken from it, less caches and ``*.pt`` files.
        name: the top folder, i.e. the bundle name users download by.
        large_files: a ``large_files.yml`` to pack instead of the bundle's own (e.g. one written for a release).

    Returns:
        ``output``.

    Raises:
        BadInputError: the ``large_files.yml`` to pack is the placeholder (an entry without ``hash_val``), not one
            written by :func:`write_large_files` for published weights.
    """
    large_files = large_files or os.path.join(bundle_root, "large_files.yml")
    _require_published(large_files)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in BUNDLE_FILES:
            source = large_files if entry == "large_files.yml" else os.path.join(bundle_root, entry)
            if os.path.isfile(source):
                archive.write(source, f"{name}/{entry}")
            for folder, dirs, files in os.walk(source):
                dirs[:] = sorted(d for d in dirs if not d.endswith(_LEFT_OUT))
                for file in sorted(f for f in files if not f.endswith(_LEFT_OUT)):
                    path = os.path.join(folder, file)
                    archive.write(path, f"{name}/{os.path.relpath(path, bundle_root)}")
        archive.writestr(f"{name}/models/", "")  # where download_large_files puts the weights
    return output
