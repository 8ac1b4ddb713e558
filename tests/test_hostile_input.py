"""Hostile input: each bad input is refused with an error that names the file and the problem, before training.

Function-level tests on files made here and on copies of real STS CT; bundle-level tests run pretraining over a
folder with one truncated file, and a resume from a checkpoint of another architecture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pgl_bundle.data import check_checkpoint, check_datalist, load_datalist, make_synthetic_dataset
from pgl_bundle.errors import BadInputError, DiskSpaceError, report_user_errors_last
from pgl_bundle.networks import PGLResNetEncoder
from tiny import TINY_PRETRAIN, TINY_SEGMENTATION_NETWORK

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {
    **TINY_PRETRAIN,
    "num_workers": 0,
    "batch_size": 1,
    "max_epochs": 1,
}


def nifti(path, array, spacing=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def truncated_copy(source, target) -> str:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return str(target)


def problems(items, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        check_datalist(items, **kwargs)
    return str(error.value)


@pytest.fixture()
def sts(shared_data):
    return shared_data / "sts"


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz: listed as 'image'"):
        load_datalist(str(datalist))
    # as the configs read a dataset.json (the files checked with the others): the same nearest-folder hint
    items = load_datalist(str(datalist), must_exist=False)
    assert f"{missing}: does not exist; {tmp_path} holds dataset.json" in problems(items)


def test_corrupt_and_truncated_nifti(tmp_path, sts):
    truncated = truncated_copy(sts / "STS_001" / "CT_image.nii.gz", tmp_path / "truncated.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(os.urandom(4096))
    message = problems([{"image": truncated}, {"image": str(corrupt)}])
    assert message.startswith("2 of 2 datalist items cannot be used")
    assert message.splitlines()[-1].startswith(f"First bad file: {truncated}: cannot be read: corrupt")
    assert f"{truncated}: cannot be read: corrupt, truncated or not an image (EOFError" in message
    assert f"{corrupt}: cannot be read" in message


@pytest.mark.parametrize(
    "shape, expected",
    [((40, 40), "is a 2D image"), ((40, 40, 1), "is a single 2D slice"), ((40, 40, 20, 3), "is a 4D series of 3")],
)
def test_not_a_3d_volume(tmp_path, shape, expected):
    path = nifti(tmp_path / "wrong.nii.gz", np.zeros(shape, np.float32))
    assert f"{path}: {expected}" in problems([{"image": path}])


def test_volume_smaller_than_the_crop(tmp_path):
    small = nifti(tmp_path / "small.nii.gz", np.zeros((40, 40, 20), np.int16))
    assert check_datalist([{"image": small}], min_size=(32, 32, 16)) == [{"image": small}]
    message = problems([{"image": small}], min_size=(32, 32, 16), pixdim=(2.0, 2.0, 2.0))  # 20 x 20 x 10 resampled
    assert (
        f"{small}: is smaller than the patch: (20, 20, 10) voxels at pixdim (2.0, 2.0, 2.0), the patch is "
        "(32, 32, 16); thin scans can be padded up to it instead (--min_image_size null)"
    ) in message


def test_nan_and_infinite_voxels(tmp_path, caplog):
    """Reported as such, not as values that do not look like Hounsfield units (``nan..nan``)."""
    volume = np.zeros((40, 40, 20), np.float32)
    volume[1, 2, 3], volume[4, 5, 6] = np.nan, np.inf
    path = nifti(tmp_path / "nan.nii.gz", volume)
    with caplog.at_level(logging.WARNING):
        message = problems([{"image": path}], require_hu=True)
        assert message.splitlines()[1:2] == [f"  {path}: has 2 NaN or infinite voxel(s)"]
        assert problems([{"image": path}]).splitlines()[1:2] == [f"  {path}: has 2 NaN or infinite voxel(s)"]
    assert "Hounsfield" not in message + caplog.text


def test_label_outside_the_declared_classes(tmp_path, sts):
    mask = nib.load(sts / "STS_003" / "CT_mask.nii.gz")
    values = np.asarray(mask.dataobj).copy()
    values[0, 0, 0] = 7
    label = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(values, mask.affine, mask.header), label)
    item = {"image": str(sts / "STS_003" / "CT_image.nii.gz"), "label": label}
    message = problems([item], label_key="label", num_classes=2)
    assert f"{label}: has values outside the declared classes 0..1: 7" in message


def test_image_and_label_on_different_grids(tmp_path, sts):
    other_shape = {"image": str(sts / "STS_001" / "CT_image.nii.gz"), "label": str(sts / "STS_002" / "CT_mask.nii.gz")}
    assert f"{other_shape['label']}: is on another grid than its image: shape" in problems(
        [other_shape], label_key="label", num_classes=2
    )
    image = nifti(tmp_path / "image.nii.gz", np.zeros((40, 40, 20), np.int16))
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 20), np.uint8), np.eye(4) + np.eye(4, k=3) * 5), shifted)
    assert f"{shifted}: is on another grid than its image: affines differ" in problems(
        [{"image": image, "label": str(shifted)}], label_key="label", num_classes=2
    )


def test_real_labelled_pairs_pass(sts):
    items = load_datalist(str(sts), keys=["image", "label"], num_items=3)
    assert check_datalist(items, label_key="label", num_classes=2, min_size=(64, 64, 16), num_workers=2) == items


def test_bad_items_are_left_out_on_request(tmp_path, sts, caplog):
    good = {"image": str(sts / "STS_001" / "CT_image.nii.gz")}
    bad = {"image": truncated_copy(sts / "STS_001" / "CT_image.nii.gz", tmp_path / "truncated.nii.gz")}
    with caplog.at_level(logging.WARNING):
        assert check_datalist([good, bad], skip_bad=True) == [good]
    assert f"leaving out 1 of 2 datalist items:\n  {bad['image']}: cannot be read" in caplog.text


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no volumes found"):
        load_datalist(str(tmp_path / "empty"))
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"dataset.json: its lists \['training', 'validation', 'test'\] hold no item"):
        load_datalist(str(datalist))
    with pytest.raises(ValueError, match="no usable item in a datalist of 1"):
        check_datalist([{"image": str(tmp_path / "nope.nii.gz")}], skip_bad=True)


def test_datalist_with_wrong_keys(tmp_path):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"img": "a.nii.gz", "seg": "b.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"dataset.json: an entry of 'training' lacks the key\(s\) \['image'\]"):
        load_datalist(str(datalist))
    datalist.write_text(json.dumps({"train": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"dataset.json: has none of the lists .* \(found \['train'\]\)"):
        load_datalist(str(datalist))


def test_checkpoint_from_another_architecture(tmp_path):
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block_inplanes=(8, 8, 8, 8))
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"network": encoder.state_dict(), "trainer": {"iteration": 1}}, path)
    assert check_checkpoint(path, {"network": encoder, "trainer": object()}) == path
    wider = PGLResNetEncoder(layers=(1, 1, 1, 1), block_inplanes=(16, 8, 8, 8))
    with pytest.raises(
        ValueError,
        match=rf"{path}: 'network' was saved from a different architecture.*conv1.weight: "
        r"\(8, 1, 7, 7, 3\) in the file, \(16, 1, 7, 7, 3\) in the network",
    ):
        check_checkpoint(path, {"network": wider})
    deeper = PGLResNetEncoder(layers=(2, 1, 1, 1), block_inplanes=(8, 8, 8, 8))
    with pytest.raises(ValueError, match=r"different architecture.*missing \(\d+\): layer1.1"):
        check_checkpoint(path, {"network": deeper})
    with pytest.raises(ValueError, match=r"not a training checkpoint: it holds \['network', 'trainer'\], resuming"):
        check_checkpoint(path, {"network": encoder, "optimizer": object()})
    truncated = truncated_copy(tmp_path / "checkpoint.pt", tmp_path / "truncated.pt")
    with pytest.raises(ValueError, match=f"{truncated}: not a readable checkpoint"):
        check_checkpoint(truncated, {"network": encoder})
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint to resume from not found"):
        check_checkpoint(str(tmp_path / "nope.pt"), {"network": encoder})


def pretrain(repo_root, bundle_root, data, **overrides) -> subprocess.CompletedProcess:
    # fire reads True / False as booleans, but JSON's true / false as strings (both truthy)
    values = {k: repr(v) if isinstance(v, bool) else json.dumps(v) for k, v in {**TINY, **overrides}.items()}
    args = [arg for k, v in values.items() for arg in (f"--{k}", v)]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/pretrain.json",
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        str(bundle_root),
        "--dataset_dir",
        str(data),
        *args,
    ]
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def folder_with_a_broken_file(tmp_path_factory, shared_data):
    """Four small synthetic CTs, a truncated copy of a real one and a 2D file, in one folder."""
    root = tmp_path_factory.mktemp("hostile")
    make_synthetic_dataset(str(root / "synthetic"), 4, shape=(64, 64, 24))
    folder = root / "ct"
    shutil.copytree(root / "synthetic" / "imagesTr", folder)
    broken = truncated_copy(shared_data / "unlabeled" / "lung_pet_ct_dx.nii.gz", folder / "broken.nii.gz")
    nifti(folder / "flat.nii.gz", np.zeros((64, 64), np.int16))  # 2D: checked before the space estimate
    return folder, broken


def test_pretraining_stops_before_training_and_keeps_earlier_outputs(repo_root, tmp_path, folder_with_a_broken_file):
    """Even with --overwrite True, nothing is moved or written when the input checks fail; and the error is printed
    alone, not inside MONAI's wrapping traceback."""
    folder, broken = folder_with_a_broken_file
    (tmp_path / "models").mkdir()
    earlier = tmp_path / "models" / "pretrained_encoder.pt"
    earlier.write_bytes(b"weights of an earlier run")
    result = pretrain(repo_root, tmp_path, folder, overwrite=True)
    assert result.returncode != 0
    flat = folder / "flat.nii.gz"
    tail = result.stderr.strip().splitlines()[-5:]
    assert tail[0] == "ERROR: BadInputError: 2 of 6 datalist items cannot be used:", tail
    assert tail[1].startswith(f"  {broken}: cannot be read: corrupt, truncated or not an image"), tail
    assert tail[2] == f"  {flat}: is a 2D image (shape (64, 64)), a 3D volume is expected", tail
    assert (
        tail[3] == "Fix or remove them, or leave them out with --skip_bad_volumes True (in Python: skip_bad=True)."
    ), tail
    assert tail[4].startswith(f"First bad file: {broken}: cannot be read"), tail  # the last line names a file
    assert "Traceback" not in result.stderr  # the message alone; PGL_DEBUG=1 adds the traceback
    assert "train_loss" not in result.stdout + result.stderr
    assert earlier.read_bytes() == b"weights of an earlier run"
    assert os.listdir(tmp_path / "models") == ["pretrained_encoder.pt"]


def test_pretraining_skips_the_broken_file_on_request(repo_root, tmp_path, folder_with_a_broken_file):
    folder, broken = folder_with_a_broken_file
    result = pretrain(repo_root, tmp_path, folder, skip_bad_volumes=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert f"leaving out 2 of 6 datalist items:\n  {broken}: cannot be read" in log
    assert f"{folder / 'flat.nii.gz'}: is a 2D image" in log
    assert log.count("train_loss:") == 4
    # resuming with another architecture is refused, naming the checkpoint
    checkpoint = tmp_path / "models" / "checkpoints" / "checkpoint_final.pt"
    result = pretrain(
        repo_root,
        tmp_path,
        folder,
        skip_bad_volumes=True,
        max_epochs=2,
        encoder_width=[16, 8, 8, 8],
        resume_from=str(checkpoint),
    )
    assert result.returncode != 0
    assert f"BadInputError: {checkpoint}: 'network' was saved from a different architecture" in result.stderr
    assert "train_loss" not in result.stdout + result.stderr


def test_fine_tuning_and_inference_configs_check_their_data(repo_root, tmp_path, sts):
    """train.json (and so evaluate.json and MONAI Label's training) and inference.json run the checks above on their
    datalist when it is built, i.e. before any training or prediction."""
    from monai.bundle import ConfigParser

    mask = nib.load(sts / "STS_001" / "CT_mask.nii.gz")
    values = np.asarray(mask.dataobj).copy()
    values[0, 0, 0] = 3
    bad_label = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(values, mask.affine, mask.header), bad_label)
    truncated = truncated_copy(sts / "STS_002" / "CT_image.nii.gz", tmp_path / "image.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "training": [
                    {"image": str(sts / "STS_001" / "CT_image.nii.gz"), "label": bad_label},
                    {"image": truncated, "label": str(sts / "STS_002" / "CT_mask.nii.gz")},
                ]
            }
        )
    )
    for config, expected in (
        ("train.json", [f"{bad_label}: has values outside", f"{truncated}: cannot be read"]),
        ("inference.json", [f"{truncated}: cannot be read"]),
    ):
        parser = ConfigParser()
        parser.read_config(str(repo_root / "configs" / config))
        parser.update(
            {
                "bundle_root": str(tmp_path),
                "dataset_dir": str(tmp_path / "dataset.json"),
                "label_names": ["background", "tumour"],
                "num_workers": 0,
            }
        )
        with pytest.raises(RuntimeError) as error:  # the config parser's error, raised from the check's ValueError
            parser.get_parsed_content("datalist")
        cause = error.value.__cause__ or error.value.__context__
        assert isinstance(cause, ValueError), repr(cause)
        for line in expected:
            assert line in str(cause), (config, str(cause))


def test_volumes_that_do_not_look_like_hounsfield_units(tmp_path, sts, caplog):
    """An MR-like copy of a real CT (all values positive, no air) is warned about, naming it and its value range, in
    the same pass that checks the files; with require_hu it is refused. The real CT passes without a warning."""
    ct = nib.load(sts / "STS_001" / "CT_image.nii.gz")
    values = np.asarray(ct.dataobj, dtype=np.float32)
    mr_values = np.round(36 + (values + 1000) * 1.5).astype(np.int16)  # 36..3632
    mr_like = nifti(tmp_path / "mr_like.nii.gz", mr_values, spacing=ct.header.get_zooms())
    low, high = mr_values.min(), mr_values.max()
    items = [{"image": str(sts / "STS_001" / "CT_image.nii.gz")}, {"image": mr_like}]
    with caplog.at_level(logging.WARNING):
        assert check_datalist(items) == items
    assert "1 of 2 volumes may not be CT in Hounsfield units" in caplog.text
    assert (
        f"{mr_like}: intensities {low}..{high} do not look like CT in Hounsfield units: all values are non-negative"
    ) in caplog.text
    assert "STS_001" not in caplog.text
    assert f"{mr_like}: intensities {low}..{high} do not look like CT" in problems(items, require_hu=True)


def dicom_with_two_series(source, target, description: bytes = b"CT Lung 3.0 ") -> None:
    """A copy of the 20-slice series whose first 12 slices get the series UID 1.23 and the last 8 the UID 1.24 and
    another ``description``: two series in one folder. Byte edits of the explicit-VR little-endian files (the
    source's UID element is empty, so it grows by 4 bytes; no length elsewhere covers it)."""
    target.mkdir()
    for index, path in enumerate(sorted(source.iterdir())):
        data = path.read_bytes()
        uid = b"1.23" if index < 12 else b"1.24"
        empty = b"\x20\x00\x0e\x00UI\x00\x00"
        assert data.count(empty) == 1, path
        data = data.replace(empty, b"\x20\x00\x0e\x00UI\x04\x00" + uid)
        if index >= 12:
            data = data.replace(b"CT Body 3.0 ", description.ljust(12))
        (target / path.name).write_bytes(data)


@pytest.mark.parametrize("description, shown", [(b"CT Lung 3.0 ", "CT Lung 3.0"), (b"", "no description")])
def test_a_dicom_folder_with_two_series_is_refused_listing_them(tmp_path, shared_data, description, shown):
    folder = tmp_path / "two_series"
    dicom_with_two_series(shared_data / "abdomen" / "example_ct_dicom_series", folder, description)
    assert load_datalist(str(folder)) == [{"image": str(folder)}]
    single = str(shared_data / "abdomen" / "example_ct_dicom_series")
    message = problems([{"image": single}, {"image": str(folder)}])
    assert message.startswith("1 of 2 datalist items cannot be used")
    assert (
        f"{folder}: holds 2 DICOM series, where one volume is expected: 1.23 (CT Body 3.0, 12 files); 1.24 "
        f"({shown}, 8 files). Put each series in a folder of its own."
    ) in message


def test_one_volume_as_dataset_and_not_found_messages(tmp_path, sts):
    volume = str(sts / "STS_001" / "CT_image.nii.gz")
    assert load_datalist(volume) == [{"image": volume}]
    with pytest.raises(ValueError, match=r"one volume, but \['label'\] are needed too"):
        load_datalist(volume, keys=["image", "label"])
    with pytest.raises(
        FileNotFoundError,
        match=rf"{sts}/STS_001/CT_imag.nii.gz: not found \(looked for a "
        rf"dataset.json, a volume .*\); {sts}/STS_001 holds CT_image.nii.gz, "
        "CT_mask.nii.gz",
    ):
        load_datalist(str(sts / "STS_001" / "CT_imag.nii.gz"))
    with pytest.raises(
        FileNotFoundError,
        match=rf"STS_0\*/CT.nii.gz: the glob pattern matches no file; {sts} "
        r"holds LICENSE.md, SOURCE_README.md, STS_001, STS_002, STS_003 and \d+",
    ):
        load_datalist(str(sts / "STS_0*" / "CT.nii.gz"))
    (tmp_path / "notes.txt").write_text("not a volume")
    with pytest.raises(
        ValueError,
        match=rf"{tmp_path}: no volumes found \(looked for .nii.gz.*\); {tmp_path} holds "
        "notes.txt",
    ):
        load_datalist(str(tmp_path))
    with pytest.raises(ValueError, match="notes.txt: not a dataset.json nor a volume"):
        load_datalist(str(tmp_path / "notes.txt"))
    with pytest.raises(
        FileNotFoundError,
        match=rf"nope.pt: checkpoint to resume from not found; {tmp_path} holds "
        "notes.txt",
    ):
        check_checkpoint(str(tmp_path / "nope.pt"), {})


def raised(error: BaseException, wrapped_in: type[BaseException] | None = None) -> BaseException:
    """``error`` as raised (with its traceback), optionally wrapped as monai.bundle wraps a config's errors."""
    try:
        try:
            raise error
        except BaseException as e:
            if wrapped_in is None:
                raise
            raise wrapped_in("Failed to evaluate ConfigExpression: $pgl_bundle.check_datalist(...)") from e
    except BaseException as e:
        return e


def test_a_user_error_prints_as_its_message_alone(monkeypatch, capsys):
    """Anywhere in the chain, a user error prints as one ERROR line; PGL_DEBUG=1 adds the traceback before it. Other
    errors print as Python prints them."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    report_user_errors_last()
    monkeypatch.delenv("PGL_DEBUG", raising=False)
    for error, expected in (
        (raised(BadInputError("/data/a.nii.gz: cannot be read"), RuntimeError), "BadInputError: /data/a.nii.gz: c"),
        (raised(DiskSpaceError(28, "disk full: /m/c.pt: saving failed")), "DiskSpaceError: disk full: /m/c.pt: s"),
    ):
        sys.excepthook(type(error), error, error.__traceback__)
        assert capsys.readouterr().err.startswith(f"ERROR: {expected}")
    error = raised(BadInputError("/data/a.nii.gz: cannot be read"), RuntimeError)
    sys.excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err == "ERROR: BadInputError: /data/a.nii.gz: cannot be read\n"
    monkeypatch.setenv("PGL_DEBUG", "1")
    sys.excepthook(type(error), error, error.__traceback__)
    printed = capsys.readouterr().err
    assert printed.startswith("Traceback") and "RuntimeError: Failed to evaluate ConfigExpression" in printed
    assert printed.endswith("\nERROR: BadInputError: /data/a.nii.gz: cannot be read\n")
    monkeypatch.delenv("PGL_DEBUG")
    other = raised(KeyError("not a user error"), RuntimeError)
    sys.excepthook(type(other), other, other.__traceback__)
    printed = capsys.readouterr().err
    assert printed.startswith("Traceback") and printed.endswith(
        "RuntimeError: Failed to evaluate ConfigExpression: $pgl_bundle.check_datalist(...)\n"
    )


def test_generating_synthetic_data_is_said(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        make_synthetic_dataset(str(tmp_path), 1, shape=(32, 32, 16))
        make_synthetic_dataset(str(tmp_path), 1, shape=(32, 32, 16))
    assert f"no dataset_dir given: generating 1 synthetic CT phantoms of (32, 32, 16) voxels in {tmp_path}" in (
        caplog.text
    )
    assert f"using the synthetic CT phantoms in {tmp_path} (made earlier)" in caplog.text


# fine-tuning's network at its smallest, on the synthetic phantoms' six classes: a run of one iteration takes seconds
TINY_FINE_TUNING = {
    **TINY_SEGMENTATION_NETWORK,
    "num_workers": 0,
    "patch_size": [32, 32, 16],
    "batch_size": 1,
    "num_samples": 1,
    "num_iterations": 1,
    "val_interval": 1,
    "cache_rate": 0,
}
STAGES = {"evaluation": ["train.json", "evaluate.json"], "inference": ["inference.json"]}


def run_stage(repo_root, configs, bundle_root, **overrides) -> None:
    """``python -m monai.bundle run`` in this process."""
    from monai.bundle import run as bundle_run

    bundle_run(
        "run",
        config_file=[str(repo_root / "configs" / name) for name in configs],
        logging_file=False,
        bundle_root=str(bundle_root),
        **overrides,
    )


def user_error(function, *args, **kwargs):
    """The user error that ``function(*args, **kwargs)`` raises (anywhere in the exception's chain)."""
    from pgl_bundle.errors import user_error_in_chain

    with pytest.raises(Exception) as error:
        function(*args, **kwargs)
    cause = user_error_in_chain(error.value)
    assert cause is not None, repr(error.value)
    return cause


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("phantoms")), 3, shape=(64, 64, 24))


@pytest.fixture(scope="module")
def fine_tuned(repo_root, phantoms, tmp_path_factory):
    """models/ of a one-iteration fine-tuning on the phantoms (model.pt and its plan, model.json)."""
    root = tmp_path_factory.mktemp("fine_tuned")
    hook, factory = sys.excepthook, logging.getLogRecordFactory()  # set by the config; conftest restores per test
    run_stage(repo_root, ["train.json"], root, dataset_dir=phantoms, num_val_cases=1, **TINY_FINE_TUNING)
    sys.excepthook = hook
    logging.setLogRecordFactory(factory)
    return root / "models"


@pytest.mark.parametrize("stage", STAGES)
def test_evaluation_and_inference_reruns_keep_earlier_results(repo_root, tmp_path, phantoms, fine_tuned, stage):
    """A second run into the same output folder stops before any data is read (here: a dataset that does not exist)
    and leaves the first run's results as they were; --overwrite True moves them to eval/replaced_<run id>/."""
    shutil.copytree(fine_tuned, tmp_path / "models")
    settings = {
        "num_workers": 0,
        "decoder_channels": TINY_FINE_TUNING["decoder_channels"],  # not in the model's plan
        **({"num_val_cases": 1} if stage == "evaluation" else {}),
    }
    run_stage(repo_root, STAGES[stage], tmp_path, dataset_dir=phantoms, **settings)
    eval_dir = tmp_path / "eval"
    results = sorted(name for name in os.listdir(eval_dir) if not name.endswith("_run.json"))
    expected = (
        ["metrics.csv", "val_mean_dice_raw.csv", "val_mean_dice_summary.csv"]
        if stage == "evaluation"
        else ["synth_000_seg.nii.gz", "synth_001_seg.nii.gz", "synth_002_seg.nii.gz"]
    )
    assert results == expected
    before = {name: (eval_dir / name).stat().st_mtime_ns for name in results}

    cause = user_error(run_stage, repo_root, STAGES[stage], tmp_path, dataset_dir=str(tmp_path / "nope"), **settings)
    assert type(cause).__name__ == "OutputExistsError", repr(cause)
    record = next(eval_dir.glob("*_run.json"))
    first_id = json.loads(record.read_text())["run_id"]
    message = str(cause)
    assert f"{eval_dir} holds the outputs of another run (run {first_id}): {', '.join(expected)}." in message
    assert f"start afresh with --overwrite True (the old outputs are moved to {eval_dir}/replaced_{first_id}/)" in (
        message
    )
    assert {name: (eval_dir / name).stat().st_mtime_ns for name in results} == before

    run_stage(repo_root, STAGES[stage], tmp_path, dataset_dir=phantoms, overwrite=True, **settings)
    aside = eval_dir / f"replaced_{first_id}"
    assert sorted(os.listdir(aside)) == sorted([*expected, record.name])
    assert sorted(name for name in os.listdir(eval_dir) if not name.endswith("_run.json")) == sorted(
        [*expected, aside.name]
    )
    assert json.loads(record.read_text())["run_id"] != first_id


def one_case(phantoms, folder) -> str:
    """A dataset.json of the phantoms' first case alone."""
    case = json.loads(Path(phantoms).read_text())["training"][0]
    folder.mkdir()
    (folder / "dataset.json").write_text(
        json.dumps({"training": [{key: str(Path(phantoms).parent / path) for key, path in case.items()}]})
    )
    return str(folder / "dataset.json")


@pytest.mark.parametrize(
    "num_val_cases, expected",
    [
        (2, "the split leaves no case for training (1 for validation; --num_val_cases 2, --num_test_cases 0): "),
        (0, "the split leaves no case for validation (1 for training; --num_val_cases 0, --num_test_cases 0), and "),
    ],
)
def test_fine_tuning_stops_on_a_split_without_training_or_validation_cases(
    repo_root, tmp_path, phantoms, num_val_cases, expected
):
    """One case: the default split (two validation cases) leaves nothing to train on, and --num_val_cases 0 nothing
    to choose the model with; both stop before training with one line naming the counts and the option."""
    data = one_case(phantoms, tmp_path / "one_case")
    bundle = tmp_path / "bundle"
    cause = user_error(
        run_stage,
        repo_root,
        ["train.json"],
        bundle,
        dataset_dir=data,
        **{**TINY_FINE_TUNING, "num_val_cases": num_val_cases},
    )
    assert type(cause).__name__ == "BadInputError" and expected in str(cause), repr(cause)
    assert "\n" not in str(cause)
    assert not (bundle / "models").exists() or not os.listdir(bundle / "models")


def test_fine_tuning_that_writes_no_model_fails(repo_root, tmp_path, phantoms):
    """Without its best-model saver (here disabled), a fine-tuning run would end with exit 0 and no models/model.pt."""
    cause = user_error(
        run_stage,
        repo_root,
        ["train.json"],
        tmp_path,
        dataset_dir=phantoms,
        num_val_cases=1,
        **{**TINY_FINE_TUNING, "validate#handlers#2#_disabled_": True},
    )
    assert type(cause).__name__ == "NoOutputError", repr(cause)
    assert str(cause).startswith(f"{tmp_path}/models/model.pt: fine-tuning ended without writing its model")
