"""Data in: datalists from dataset.json / folder / glob, and NIfTI, NRRD and DICOM through the pretraining chain."""

from __future__ import annotations

import json

import itk
import pytest
import torch
from monai.transforms import Compose, LoadImaged, ScaleIntensityRanged
from pgl_bundle.data import deterministic_transforms, load_datalist, make_synthetic_dataset


@pytest.fixture(scope="module")
def preprocessing():
    """Load, pretraining's deterministic chain (what the prepare stage stores), then the HU window."""
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            *deterministic_transforms((-1024, 325), None, (134, 134, 22)),
            ScaleIntensityRanged("image", -1024, 325, 0.0, 1.0, clip=True),
        ]
    )


def test_sources(shared_data):
    assert len(load_datalist(str(shared_data / "sts" / "dataset.json"))) == 30
    assert len(load_datalist(str(shared_data / "sts"))) == 30  # a folder with a dataset.json uses it
    paired = load_datalist(str(shared_data / "sts"), keys=["image", "label"], num_items=2)
    assert [set(item) for item in paired] == [{"image", "label"}] * 2
    assert len(load_datalist(str(shared_data / "unlabeled"))) == 3
    assert len(load_datalist(str(shared_data / "sts" / "STS_00*" / "CT_image.nii.gz"))) == 9
    dicom = load_datalist(str(shared_data / "abdomen"))
    assert str(shared_data / "abdomen" / "example_ct_dicom_series") in [item["image"] for item in dicom]
    series = load_datalist(str(shared_data / "abdomen" / "example_ct_dicom_series"))  # the series folder itself
    assert series == [{"image": str(shared_data / "abdomen" / "example_ct_dicom_series")}]


def test_source_errors(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_datalist(str(tmp_path / "no_such_folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no volumes found"):
        load_datalist(str(tmp_path / "empty"))
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match="lacks the key"):
        load_datalist(str(datalist), keys=["image", "label"])
    with pytest.raises(FileNotFoundError, match=r"a\.nii\.gz"):
        load_datalist(str(datalist))


@pytest.mark.parametrize("name", ["nifti", "nrrd", "dicom"])
def test_formats_load_through_the_pretraining_chain(name, preprocessing, shared_data, tmp_path):
    sts = shared_data / "sts" / "STS_001" / "CT_image.nii.gz"
    if name == "nifti":
        path = sts
    elif name == "nrrd":
        path = tmp_path / "ct.nrrd"
        itk.imwrite(itk.imread(str(sts)), str(path))
    else:
        path = shared_data / "abdomen" / "example_ct_dicom_series"
    image = preprocessing({"image": str(path)})["image"]
    assert image.ndim == 4 and image.shape[0] == 1
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert all(s >= m for s, m in zip(image.shape[1:], (134, 134, 22)))  # padded up to the largest crop


def test_nrrd_and_nifti_agree(preprocessing, shared_data, tmp_path):
    sts = shared_data / "sts" / "STS_001" / "CT_image.nii.gz"
    itk.imwrite(itk.imread(str(sts)), str(tmp_path / "ct.nrrd"))
    a = preprocessing({"image": str(sts)})["image"]
    b = preprocessing({"image": str(tmp_path / "ct.nrrd")})["image"]
    assert a.shape == b.shape
    torch.testing.assert_close(a.as_tensor(), b.as_tensor(), atol=1e-5, rtol=0)


def test_synthetic_dataset_is_made_once(tmp_path):
    path = make_synthetic_dataset(str(tmp_path), num_volumes=2, shape=(64, 64, 24))
    items = load_datalist(path, keys=["image", "label"])
    assert len(items) == 2
    stamp = (tmp_path / "imagesTr" / "synth_000.nii.gz").stat().st_mtime_ns
    assert make_synthetic_dataset(str(tmp_path), num_volumes=2, shape=(64, 64, 24)) == path
    assert (tmp_path / "imagesTr" / "synth_000.nii.gz").stat().st_mtime_ns == stamp
