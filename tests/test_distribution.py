"""Weights distribution: pack the bundle, serve it and its weights over HTTP, fetch them with MONAI's commands."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import site
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser
from monai.bundle.scripts import download_large_files
from pgl_bundle.networks import PGLResNetEncoder, PGLSegmentationNet
from pgl_bundle.release import BUNDLE_NAME, WEIGHTS, pack, write_large_files

ENCODER = {"layers": (1, 1, 1, 1), "block": "basic", "block_inplanes": (8, 8, 8, 8)}


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def release(tmp_path, repo_root):
    """A release on a local HTTP server: tiny weights, their large_files.yml and the bundle zip, all in one folder."""
    bundle = tmp_path / "release"
    (bundle / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(PGLResNetEncoder(**ENCODER).state_dict(), bundle / "models" / "pretrained_encoder.pt")
    torch.save(
        PGLSegmentationNet(PGLResNetEncoder(**ENCODER), out_channels=2, decoder_channels=(8,) * 5).state_dict(),
        bundle / "models" / "model.pt",
    )
    served = bundle / "models"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    large_files = write_large_files(url, bundle_root=str(bundle), output=str(tmp_path / "large_files.yml"))
    pack(str(served / f"{BUNDLE_NAME}_v0.1.0.zip"), bundle_root=str(repo_root), large_files=large_files)
    yield served, url
    server.shutdown()
    server.server_close()


def test_zip_has_one_top_folder_and_no_weights(release):
    served, _ = release
    names = zipfile.ZipFile(served / f"{BUNDLE_NAME}_v0.1.0.zip").namelist()
    assert {n.split("/")[0] for n in names} == {BUNDLE_NAME}
    for required in (
        "configs/pretrain.json",
        "configs/multi_gpu_pretrain.json",
        "configs/metadata.json",
        "models/",
        "large_files.yml",
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "pgl_bundle/__init__.py",
        "pgl_bundle/networks/encoder.py",
    ):  # `pip install -e <bundle>` needs pyproject, README, package
        assert f"{BUNDLE_NAME}/{required}" in names, required
    assert not [n for n in names if n.endswith(".pt") or "__pycache__" in n]


def test_download_bundle_and_weights_with_hashes_checked(release, tmp_path):
    served, url = release
    target = tmp_path / "downloaded"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "download",
        "--name",
        BUNDLE_NAME,
        "--url",
        f"{url}/{BUNDLE_NAME}_v0.1.0.zip",
        "--bundle_dir",
        str(target),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bundle = target / BUNDLE_NAME
    ConfigParser.load_config_files([str(bundle / "configs" / name) for name in ("pretrain.json", "metadata.json")])
    listed = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [entry["path"] for entry in listed] == list(WEIGHTS)
    assert all(entry["hash_type"] == "md5" and len(entry["hash_val"]) == 32 for entry in listed)

    download_large_files(bundle_path=str(bundle))
    for path in WEIGHTS:
        assert md5(bundle / path) == md5(served / path.split("/")[-1]), path
    encoder = PGLResNetEncoder(**ENCODER)
    encoder.load_state_dict(torch.load(bundle / "models" / "pretrained_encoder.pt", weights_only=True))

    # a tampered file on the server is refused by its md5
    (bundle / "models" / "model.pt").unlink()
    (served / "model.pt").write_bytes(b"not the published weights")
    with pytest.raises(HashCheckError, match="md5 hash check"):
        download_large_files(bundle_path=str(bundle))


# the smallest bundle that still runs every stage: a ResNet of 8-wide basic blocks, 32 x 32 x 16 patches
TINY = [
    "--encoder_layers",
    "[1,1,1,1]",
    "--encoder_block",
    "basic",
    "--encoder_width",
    "[8,8,8,8]",
    "--patch_size",
    "[32,32,16]",
    "--num_workers",
    "0",
]


def test_download_install_and_run_from_the_download_folder(release, tmp_path, shared_data):
    """The documented user flow: download the zip, `pip install -e` the bundle, then pretrain, fine-tune and infer
    from the download folder with `python -m monai.bundle run ... --bundle_root <bundle>`.

    A virtual environment (with the test environment's packages; pip offline) receives the install, so the `pgl_bundle`
    that runs is the downloaded one; PYTHONPATH is dropped so that no checkout can stand in for it.
    """
    _, url = release
    work = tmp_path / "downloads"
    work.mkdir()
    # one thread per process: two OpenMP threads spin-waiting on cores that other processes share made one step of
    # the tiny network take 2.5 s instead of 0.05 s on 2 CPU cores, and fine-tuning outlast the 300 s limit
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}

    def run(*cmd: str) -> str:
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, " ".join(cmd) + "\n" + result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout + result.stderr

    run(
        sys.executable,
        "-m",
        "monai.bundle",
        "download",
        "--name",
        BUNDLE_NAME,
        "--url",
        f"{url}/{BUNDLE_NAME}_v0.1.0.zip",
        "--bundle_dir",
        ".",
    )
    # A venv seeing the packages of the Python that runs these tests (pip, torch, setuptools>=77 as torch requires):
    # --system-site-packages would show those of the base installation instead, whose setuptools may predate the
    # pyproject's licence string (Python 3.11's venv default is 65.5), and which may lack torch altogether.
    run(sys.executable, "-m", "venv", "--without-pip", "venv")
    python = str(work / "venv" / "bin" / "python")
    venv_site = run(python, "-c", "import site; print(site.getsitepackages()[0])").strip().splitlines()[-1]
    (Path(venv_site) / "tests_python.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "-e",
        BUNDLE_NAME,
    )
    package = run(python, "-c", "import pgl_bundle; print(pgl_bundle.__file__)").strip().splitlines()[-1]
    assert package == str(work / BUNDLE_NAME / "pgl_bundle" / "__init__.py")

    sts = shared_data / "sts"
    cases = [
        {"image": str(sts / c / "CT_image.nii.gz"), "label": str(sts / c / "CT_mask.nii.gz")}
        for c in ("STS_019", "STS_008")
    ]  # the two smallest
    (work / "labelled.json").write_text(json.dumps({"training": cases}))
    (work / "new.json").write_text(json.dumps({"training": [{"image": cases[0]["image"]}]}))
    bundle = ["--bundle_root", BUNDLE_NAME, *TINY]
    run(
        python,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        f"{BUNDLE_NAME}/configs/pretrain.json",
        *bundle,
        "--dataset_dir",
        "labelled.json",
        "--num_volumes",
        "1",
        "--batch_size",
        "1",
        "--max_epochs",
        "1",
        "--hidden_channels",
        "32",
        "--embedding_channels",
        "16",
    )
    assert (work / BUNDLE_NAME / "models" / "pretrained_encoder.pt").is_file()
    segmentation = ["--label_names", "['background','tumour']", "--decoder_channels", "[8,8,8,8,8]"]
    log = run(
        python,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        f"{BUNDLE_NAME}/configs/train.json",
        *bundle,
        *segmentation,
        "--dataset_dir",
        "labelled.json",
        "--num_val_cases",
        "1",
        "--num_iterations",
        "2",
        "--val_interval",
        "2",
        "--batch_size",
        "1",
        "--num_samples",
        "1",
        "--pretrained_encoder",
        f"{BUNDLE_NAME}/models/pretrained_encoder.pt",
    )
    assert "encoder tensors matched" in log
    run(
        python,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        f"{BUNDLE_NAME}/configs/inference.json",
        *bundle,
        *segmentation,
        "--dataset_dir",
        "new.json",
    )
    assert (work / BUNDLE_NAME / "eval" / "CT_image_seg.nii.gz").is_file()


def test_publishing_needs_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_encoder.pt"):
        write_large_files("http://127.0.0.1", bundle_root=str(tmp_path))


def test_inference_without_weights_says_how_to_get_them(repo_root, tmp_path, shared_data):
    """A fresh download has no models/model.pt: inference stops with one line naming the file and both ways to get
    it (train, or download_large_files), not a traceback."""
    image = shared_data / "sts" / "STS_019" / "CT_image.nii.gz"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(image),
        "--num_workers",
        "0",
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(str(tmp_path / "models" / "model.pt") + ": no trained weights.")
    assert "configs/train.json" in message and "download_large_files" in message
    assert not (tmp_path / "eval").exists()
