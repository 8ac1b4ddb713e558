"""The OpenKBP converter: sparse CSVs to HU and label maps, orientation checked against anatomy, not-contoured organs
kept apart from background, missing files listed, the reserved test set never read, the fixed split; on small
synthetic patients and on the four real ones of ``openkbp-sample``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import RandFlipd
from pgl_bundle.datasets import openkbp
from pgl_bundle.datasets.openkbp import (
    GRID,
    ORGANS,
    anatomy_problems,
    convert_openkbp,
    read_patient,
    to_ras,
)
from pgl_bundle.errors import BadInputError, OutputExistsError
from pgl_bundle.experiments.presets import PRESETS

# organ centres in OpenKBP's array order (anterior->posterior, right->left, superior->inferior)
CENTRES = {
    "Brainstem": (70, 64, 40),
    "SpinalCord": (76, 64, 90),
    "LeftParotid": (62, 80, 55),
    "RightParotid": (62, 48, 55),
    "Mandible": (45, 64, 62),
}


def _write_patient(folder, organs=ORGANS, ct=True):
    """A synthetic OpenKBP patient: a box of soft tissue (HU 40) and 3 x 3 x 3 organs at :data:`CENTRES`."""
    folder.mkdir(parents=True)
    (folder / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    if ct:
        box = np.zeros(GRID, bool)
        box[60:70, 60:70, 60:70] = True
        flat = np.flatnonzero(box)
        (folder / "ct.csv").write_text(",data\n" + "".join(f"{i},{40 + 1024}.0\n" for i in flat))
    for organ in organs:
        x, y, z = CENTRES[organ]
        cube = np.zeros(GRID, bool)
        cube[x - 1 : x + 2, y - 1 : y + 2, z - 1 : z + 2] = True
        (folder / f"{organ}.csv").write_text(",data\n" + "".join(f"{i},\n" for i in np.flatnonzero(cube)))


def test_a_patient_reads_as_hu_and_organ_labels_in_ras(tmp_path):
    _write_patient(tmp_path / "pt_7")
    ct, label, spacing, missing = read_patient(str(tmp_path / "pt_7"))
    assert ct.dtype == np.int16 and ct[0, 0, 0] == -1024 and ct[64, 64, 64] == 40  # air where ct.csv lists nothing
    assert spacing == (3.906, 3.906, 2.5) and missing == []
    assert [int((label == v).sum()) for v in range(1, 6)] == [27] * 5
    ras, affine = to_ras(label, spacing)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert anatomy_problems(ras, affine) == []
    # OpenKBP's own array order read as if it were RAS breaks all three relations
    assert len(anatomy_problems(label, np.diag([3.906, 3.906, 2.5, 1]))) == 3


def test_not_contoured_is_not_background_and_missing_files_are_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(openkbp, "VALIDATION_IDS", (10,))  # a small fixed split, so that the test writes 4 patients
    monkeypatch.setattr(openkbp, "TEST_IDS", (11, 12))
    source, output = tmp_path / "provided-data", tmp_path / "out"
    for pid in [10, 11, 12, 1]:
        _write_patient(source / "train-pats" / f"pt_{pid}")
    _write_patient(source / "train-pats" / "pt_2", organs=[o for o in ORGANS if o != "Mandible"])
    _write_patient(source / "validation-pats" / "pt_3", ct=False)
    (source / "train-pats" / "pt_4").mkdir()
    (source / "train-pats" / "pt_4" / "voxel_dimensions.csv").write_text("3.9\n3.9\n")
    (source / "train-pats" / "pt_4" / "ct.csv").write_text(",data\n1,1\n")
    (source / "test-pats" / "pt_5").mkdir(parents=True)  # the reserved set: a file that cannot be parsed
    (source / "test-pats" / "pt_5" / "ct.csv").write_text("not a csv")

    dataset = json.loads(open(convert_openkbp(str(source), str(output))).read())
    report = json.loads((output / "conversion.json").read_text())
    names = [item["image"].split("/")[-1].split(".")[0] for item in dataset["training"]]
    # the fixed split: labelled pool first, then validation, then test, as compare splits it
    assert names == ["pt_1", "pt_10", "pt_11", "pt_12"]
    assert report["roles"]["pt_2"] == "pretraining only" and "Mandible" in report["not_labelled"]["pt_2"]
    assert "pt_3/ct.csv: not found" in report["skipped"]["pt_3"]
    assert "three positive spacings" in report["skipped"]["pt_4"]
    assert "pt_5" not in json.dumps(report)
    pretraining = [item["image"] for item in json.loads((output / "pretraining.json").read_text())["training"]]
    assert pretraining == ["imagesTr/pt_1.nii.gz", "imagesTr/pt_2.nii.gz"]  # no validation or test CT
    with pytest.raises(OutputExistsError, match="--overwrite True"):
        convert_openkbp(str(source), str(output))
    with pytest.raises(BadInputError, match="reserved test set"):
        convert_openkbp(str(source / "test-pats"), str(tmp_path / "other"))


def test_a_copy_without_the_split_patients_is_refused_unless_partial(shared_data, tmp_path):
    source = shared_data / "openkbp-sample" / "provided-data"
    with pytest.raises(
        BadInputError,
        match=r"60 of the fixed split.s 60 validation and test patients .* first pt_111 \(no such patient\).*--partial",
    ):
        convert_openkbp(str(source), str(tmp_path / "refused"))
    output = tmp_path / "sample"
    dataset = json.loads(open(convert_openkbp(str(source), str(output), partial=True)).read())
    assert [item["label"] for item in dataset["training"]] == [f"labelsTr/pt_{i}.nii.gz" for i in (1, 2, 4)]
    report = json.loads((output / "conversion.json").read_text())
    assert report["not_labelled"] == {"pt_3": "not contoured: Mandible"}  # pt_3's CT is a pretraining volume only
    image = nib.load(output / "imagesTr" / "pt_1.nii.gz")
    label = nib.load(output / "labelsTr" / "pt_1.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and label.get_data_dtype() == np.uint8
    assert np.allclose(image.header.get_zooms(), (3.906, 3.906, 2.5))
    values = np.asarray(image.dataobj)
    assert values.min() == -1024 and 1000 < values.max() < 3100  # HU: air to bone
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2, 3, 4, 5}
    assert anatomy_problems(np.asarray(label.dataobj), label.affine) == []


def test_fine_tuning_without_left_right_flips(repo_root):
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "train.json"))
    parser["flip_axes"] = PRESETS["openkbp"]["finetune"]["flip_axes"]
    flips = [t for t in parser.get_parsed_content("train#augmentation_transforms") if isinstance(t, RandFlipd)]
    assert sorted(t.flipper.spatial_axis for t in flips) == [1, 2]  # axis 0 of RAS is left-right
