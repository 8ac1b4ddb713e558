"""MONAI Label (monailabel 0.8.5) serving this bundle, checked as 3D Slicer and OHIF use it: over HTTP.

Run it in the MONAI Label environment of docs/README.md ("MONAI Label"), from the repository root:

    /path/to/venv/bin/python scripts/check_monailabel.py --output /tmp/ml_check

Each step is timed, and the script stops with an error naming the first check that fails:

1. ``bundle``: the bundle packed (``pgl_bundle.release.pack``) with a ``large_files.yml`` for a model the script
   writes (the bundle's network with a small encoder for a CPU, untrained, and its plan ``models/model.json``),
   unzipped into the ``monaibundle`` app's ``model/`` folder, its weights fetched by ``monai.bundle
   download_large_files`` and the plan put beside them; its labels set to the STS ones (background, tumour) in
   ``train.json``, ``inference.json`` and ``metadata.json``, as a bundle for other labels needs.
2. ``start``: ``monailabel start_server`` on 127.0.0.1 with a datastore of three STS CTs and their labels, until
   ``GET /info/`` answers.
3. ``info``: ``/info/`` lists the model as an inferer and a trainer, with the trainer's option ``val_interval``.
4. ``infer``: ``POST /infer/<model>`` on a study: a label map with the CT's shape and affine, the bundle's output
   dtype (uint8) and only its label ids.
5. ``train``: ``POST /train/<model>`` in the background as the clients send it, polled until done: one epoch of
   ``val_interval`` = 2 iterations (the trainer's own option), restoring ``models/model.pt`` and writing it again.
6. ``infer again``: as 4, with the model the server trained.
7. ``stop``: the server ended.

``--fast``: no server, MONAI Label's task classes only (``BundleTrainTask`` twice on a ``LocalDatastore``, then
``BundleInferTask``), with the small network given through the tasks' hooks as an app would add its own settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager

import fire
import nibabel as nib
import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser
from pgl_bundle.release import BUNDLE_NAME, pack
from pgl_bundle.transfer import PLAN_DEFAULTS, write_plan

LABELS = ["background", "tumour"]
ENCODER = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 32, 64, 128]}
SMALL = {
    **ENCODER,
    "decoder_channels": [64, 32, 16, 16, 8],
    "label_names": LABELS,
    "patch_size": [64, 64, 16],
    "num_workers": 0,
    "val_interval": 4,  # an epoch of the task's max_epochs: 4 iterations, not 200 (minutes on a CPU)
}
TRAIN = {"max_epochs": 1, "val_interval": 2, "val_split": 0.34, "device": "cpu", "multi_gpu": False}
PORT = 8765
START_TIMEOUT, TRAIN_TIMEOUT, REQUEST_TIMEOUT = 300, 1800, 600  # seconds; polls every 2 s within them
TIMES: dict[str, float] = {}


def _check(passed: bool, message: str) -> None:
    if not passed:
        raise SystemExit(f"check failed: {message}")


@contextmanager
def _step(name: str):
    start = time.monotonic()
    yield
    TIMES[name] = time.monotonic() - start
    print(f"[{name}] {TIMES[name]:.1f} s", flush=True)


def _datastore(output: str, data: str, cases: tuple) -> str:
    """A MONAI Label local datastore: the CTs, their labels in ``labels/final`` (links to the STS files)."""
    studies = os.path.join(output, "studies")
    os.makedirs(os.path.join(studies, "labels", "final"))
    for case in cases:
        for name, link in (
            ("CT_image", f"{studies}/{case}.nii.gz"),
            ("CT_mask", f"{studies}/labels/final/{case}.nii.gz"),
        ):
            source = os.path.abspath(f"{data}/{case}/{name}.nii.gz")
            _check(os.path.isfile(source), f"{source}: no such file (set PGL_DATA_DIR or --data)")
            os.symlink(source, link)
    return studies


def _set_labels(bundle: str, label_names: list[str]) -> None:
    """The labels in ``label_names`` of train.json and inference.json and ``outputs.pred`` of metadata.json (MONAI
    Label reads its labels there)."""
    for name in ("train.json", "inference.json", "metadata.json"):
        path = os.path.join(bundle, "configs", name)
        with open(path) as f:
            content = json.load(f)
        if name == "metadata.json":
            pred = content["network_data_format"]["outputs"]["pred"]
            pred["num_channels"] = len(label_names)
            pred["channel_def"] = {str(i): label for i, label in enumerate(label_names)}
        else:
            content["label_names"] = label_names
        with open(path, "w") as f:
            json.dump(content, f, indent=4)


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()


def _bundle(output: str, app: str) -> str:
    """Pack this bundle, unzip it into ``app``'s model folder and fetch a small untrained model into it."""
    weights = os.path.join(output, "weights")
    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update({**ENCODER, "label_names": LABELS})
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(weights, "model.pt"))
    plan = write_plan(os.path.join(weights, "model.pt"), {**PLAN_DEFAULTS, **ENCODER})
    url = "file://" + os.path.abspath(os.path.join(weights, "model.pt"))
    large_files = os.path.join(weights, "large_files.yml")
    entry = {"path": "models/model.pt", "url": url, "hash_val": _md5(os.path.join(weights, "model.pt"))}
    with open(large_files, "w") as f:
        yaml.safe_dump({"large_files": [{**entry, "hash_type": "md5"}]}, f)
    archive = pack(os.path.join(output, f"{BUNDLE_NAME}.zip"), large_files=large_files)
    models = os.path.join(app, "model")
    with zipfile.ZipFile(archive) as z:
        z.extractall(models)
    bundle = os.path.join(models, BUNDLE_NAME)
    cmd = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", bundle]
    subprocess.run(cmd, check=True, capture_output=True, timeout=REQUEST_TIMEOUT)
    _check(os.path.isfile(os.path.join(bundle, "models", "model.pt")), "download_large_files fetched no model.pt")
    shutil.copy(plan, os.path.join(bundle, "models"))
    _set_labels(bundle, LABELS)
    return bundle


def _request(path: str, data: bytes | None = None, json_body: dict | None = None) -> bytes:
    headers = {}
    if json_body is not None:
        data, headers = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
        return response.read()


def _poll(what: str, timeout: float, ready) -> None:
    """Call ``ready()`` every 2 s until it returns true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(2)
    raise SystemExit(f"check failed: {what} not done after {timeout} s")


def _server_up(server: subprocess.Popen) -> bool:
    _check(server.poll() is None, f"the server stopped (exit {server.returncode}); see its log")
    try:
        return bool(_request("/info/"))
    except OSError:
        return False


def _infer(image: str, output: str, ct_path: str) -> np.ndarray:
    """``POST /infer/<model>?image=...&output=image``; the label map must lie on the CT's grid, as uint8."""
    query = urllib.parse.urlencode({"image": image, "output": "image"})
    form = urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode()
    label_file = os.path.join(output, f"{image}_seg.nii.gz")
    with open(label_file, "wb") as f:
        f.write(_request(f"/infer/{BUNDLE_NAME}?{query}", data=form))
    ct, labels = nib.load(ct_path), nib.load(label_file)
    array = np.asarray(labels.dataobj)
    ids = [int(i) for i in np.unique(array)]
    _check(labels.shape == ct.shape, f"label map shape {labels.shape}, the CT's {ct.shape}")
    affine = np.allclose(labels.affine, ct.affine, atol=1e-3)
    _check(affine, f"label map affine\n{labels.affine}\nthe CT's\n{ct.affine}")
    _check(array.dtype == np.uint8, f"label map dtype {array.dtype}, not the bundle's uint8")
    _check(set(ids) <= set(range(len(LABELS))), f"label ids {ids}, not of {LABELS}")
    print(f"  {label_file}: shape {labels.shape}, the CT's affine, {array.dtype}, label ids {ids}")
    return array


def _train_done() -> bool:
    status = json.loads(_request("/train/"))
    _check(status.get("status") != "ERROR", f"training failed: {status}")
    return status.get("status") == "DONE"


def _stop(server: subprocess.Popen) -> None:
    """End the server's process group (the server and any training process it started): SIGTERM, then SIGKILL."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def serve(output: str, data: str, cases: tuple) -> None:
    """The server steps (module docstring, 1 to 7)."""
    monailabel = os.path.join(os.path.dirname(sys.executable), "monailabel")
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable}  # the command runs `python`: this one, not PATH's
    studies = _datastore(output, data, cases)
    with _step("bundle"):
        os.makedirs(os.path.join(output, "weights"))
        apps = os.path.join(output, "apps")
        download = [monailabel, "apps", "--download", "--name", "monaibundle", "--output", apps]
        subprocess.run(download, check=True, env=env)
        bundle = _bundle(output, os.path.join(apps, "monaibundle"))
    model = os.path.join(bundle, "models", "model.pt")
    log = open(os.path.join(output, "server.log"), "w")
    # zoo_source ngc: the app takes the model folder as it is and lists no model zoo (which needs the network)
    cmd = [monailabel, "start_server", "--app", os.path.join(apps, "monaibundle"), "--studies", studies]
    cmd += ["--conf", "models", BUNDLE_NAME, "--conf", "zoo_source", "ngc", "--host", "127.0.0.1", "--port", str(PORT)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        with _step("start"):
            _poll("server start", START_TIMEOUT, lambda: _server_up(server))
        with _step("info"):
            info = json.loads(_request("/info/"))
            _check(BUNDLE_NAME in info["models"], f"/info lists no inferer {BUNDLE_NAME}: {list(info['models'])}")
            _check(BUNDLE_NAME in info["trainers"], f"/info lists no trainer {BUNDLE_NAME}: {list(info['trainers'])}")
            options = info["trainers"][BUNDLE_NAME]["config"]
            _check("val_interval" in options, f"the trainer's options lack val_interval: {options}")
            print(f"  labels {info['labels']}; trainer options {sorted(options)}")
        ct_path = os.path.join(studies, f"{cases[0]}.nii.gz")
        with _step("infer"):
            _infer(cases[0], output, ct_path)
        first = os.path.getmtime(model)
        with _step("train"):
            _request(f"/train/{BUNDLE_NAME}?run_sync=false", json_body=TRAIN)
            _poll("training", TRAIN_TIMEOUT, _train_done)
            _check(os.path.getmtime(model) > first, f"training did not write {model} again")
        with _step("infer again"):
            _infer(cases[0], output, ct_path)
    finally:
        with _step("stop"):
            _stop(server)
            log.close()
    print("step times (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in TIMES.items()))


def tasks(output: str, data: str, cases: tuple) -> None:
    """``--fast``: MONAI Label's train and infer task classes on the bundle, without a server."""
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask

    class SmallBundleTrainTask(BundleTrainTask):
        def _update_overrides(self, overrides: dict) -> None:
            overrides.update(SMALL)

    class SmallBundleInferTask(BundleInferTask):
        def _load_bundle_config(self, path, config):
            parser = super()._load_bundle_config(path, config)
            parser.update(SMALL)
            return parser

    studies, bundle = _datastore(output, data, cases), os.path.join(output, "model", "pgl")
    shutil.copytree("configs", os.path.join(bundle, "configs"))
    _set_labels(bundle, LABELS)
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    task = SmallBundleTrainTask(bundle, conf={})
    _check(task.is_valid(), "BundleTrainTask did not accept the bundle")
    request = {"model": "pgl", **TRAIN, "val_interval": SMALL["val_interval"], "pretrained": True}
    model = os.path.join(bundle, "models", "model.pt")
    with _step("train from scratch"):
        task(request, datastore)
        _check(os.path.isfile(model), f"training from scratch wrote no {model}")
    first = os.path.getmtime(model)
    with _step("train from model.pt"):
        task(request, datastore)
        _check(os.path.getmtime(model) > first, f"training from {model} did not rewrite it")
    with _step("infer"):
        infer = SmallBundleInferTask(bundle, conf={})
        _check(infer.is_valid(), "BundleInferTask did not accept the bundle")
        image = f"{studies}/{cases[0]}.nii.gz"
        label_file, _ = infer({"image": image, "device": "cpu"})
        labels = nib.load(label_file)
        _check(labels.shape == nib.load(image).shape, f"label map shape {labels.shape}, the CT's {image}")
    print("step times (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in TIMES.items()))


def main(output: str, data: str = "", cases: tuple = ("STS_019", "STS_008", "STS_025"), fast: bool = False) -> None:
    """``data``: the STS folder (default ``$PGL_DATA_DIR/sts``, ``PGL_DATA_DIR`` by default ``../shared/data``)."""
    logging.basicConfig(level=logging.INFO)
    data = data or os.path.join(os.environ.get("PGL_DATA_DIR", "../shared/data"), "sts")
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    (tasks if fast else serve)(output, data, cases)


if __name__ == "__main__":
    fire.Fire(main)
