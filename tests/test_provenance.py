"""Where an encoder came from: the data manifest, show_encoder, and publish carrying the record into the metadata."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import torch
from monai.bundle import verify_metadata
from pgl_bundle.data import make_synthetic_dataset, prepare
from pgl_bundle.networks import PGLResNetEncoder
from pgl_bundle.provenance import data_manifest, encoder_plan, pretraining_record, show_encoder, training_sources
from pgl_bundle.release import METADATA_KEY, write_large_files
from pgl_bundle.transfer import PLAN_DEFAULTS, write_plan

SMALL = {"min_size": (32, 32, 16), "min_image_size": (32, 32, 16)}


def manifest(source: str, prepared_dir) -> dict:
    return data_manifest(training_sources(prepare(source, str(prepared_dir), num_workers=1, **SMALL)))


def test_manifest_hash_is_stable_and_sees_one_changed_volume(tmp_path):
    source = make_synthetic_dataset(str(tmp_path / "ct"), 3, shape=(48, 48, 20))
    first = manifest(source, tmp_path / "prepared_a")
    # another run on the same files, prepared into another folder: the same manifest
    assert manifest(source, tmp_path / "prepared_b") == first and first["num_volumes"] == 3
    assert data_manifest(list(reversed(training_sources(prepare(source, str(tmp_path / "prepared_a"), **SMALL))))) == (
        first
    )
    # one volume rewritten with other content (its size changes): another hash, the same count
    path = tmp_path / "ct" / "imagesTr" / "synth_001.nii.gz"
    image = nib.load(path)
    noisy = np.asarray(image.dataobj) + np.random.default_rng(0).integers(0, 50, image.shape).astype(np.int16)
    nib.save(nib.Nifti1Image(noisy, image.affine, image.header), path)
    changed = manifest(source, tmp_path / "prepared_a")
    assert changed["num_volumes"] == 3 and changed["sha256"] != first["sha256"]


def test_the_record_names_data_seed_overrides_and_versions(tmp_path):
    argv = ["run", "training", "--config_file", "['configs/pretrain.json']", "--seed", "3", "--max_epochs=5"]
    datalist = [{"image": str(tmp_path / "a.npy")}]
    (tmp_path / "a.npy").write_bytes(b"1234")
    record = pretraining_record(datalist, 3, argv)
    assert record["data"] == data_manifest([(str(tmp_path / "a.npy"), 4)])
    assert record["seed"] == 3 and record["config_files"] == ["configs/pretrain.json"]
    assert record["overrides"] == {"seed": "3", "max_epochs": "5"}
    assert record["packages"]["torch"] == torch.__version__ and record["packages"]["pgl-bundle"]
    assert len(record["git_commit"]) == 40  # the tests run in the project's checkout


def published_bundle(tmp_path, repo_root):
    """A bundle folder with the repository's metadata, an encoder with its plan and provenance, and a model."""
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    shutil.copy(repo_root / "configs" / "metadata.json", bundle / "configs" / "metadata.json")
    encoder = bundle / "models" / "pretrained_encoder.pt"
    torch.save(PGLResNetEncoder(layers=[1, 1, 1, 1], block_inplanes=[8, 8, 8, 8]).state_dict(), encoder)
    record = {"data": {"num_volumes": 30, "sha256": "ab" * 32}, "seed": 0, "git_commit": "c" * 40}
    write_plan(encoder, encoder_plan({**PLAN_DEFAULTS, "patch_size": [64, 64, 16]}, record, 375))
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    return bundle, encoder


def test_show_encoder_prints_the_provenance(tmp_path, repo_root, capsys):
    _, encoder = published_bundle(tmp_path, repo_root)
    show_encoder(str(encoder))
    shown = json.loads(capsys.readouterr().out)
    assert shown["pretraining"]["iteration"] == 375 and shown["pretraining"]["data"]["num_volumes"] == 30


def test_publish_carries_the_provenance_into_valid_metadata(tmp_path, repo_root, shared_data):
    bundle, _ = published_bundle(tmp_path, repo_root)
    write_large_files("https://example.org/v1", bundle_root=str(bundle))
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    entry = metadata[METADATA_KEY]
    assert entry["path"] == "models/pretrained_encoder.pt" and entry["pretraining"]["iteration"] == 375
    assert entry["pretraining"]["data"]["sha256"] == "ab" * 32
    verify_metadata(
        meta_file=str(bundle / "configs" / "metadata.json"),
        filepath=str(shared_data.parent / "bundle" / "meta_schema_20240725.json"),
    )
