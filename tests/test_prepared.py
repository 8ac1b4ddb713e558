"""The prepare stage and pretraining on prepared data, on real CT (NIfTI and a DICOM series)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, LoadImaged, RandGaussianNoise, ScaleIntensityRanged
from pgl_bundle import EpochSeededDataset, RandPGLViewsd
from pgl_bundle.data import LoadPreparedd, deterministic_transforms, load_prepared, prepare, training_datalist
from pgl_bundle.data.prepared import PreparedVolume, estimated_bytes
from pgl_bundle.errors import BadInputError, DiskSpaceError
from tiny import TINY_PRETRAIN

WINDOW = (-1024, 325)
PAD = (134, 134, 22)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
}


def float32_pipeline(pixdim=None) -> Compose:
    """The in-memory float32 preprocessing: load, the shared deterministic chain, the HU window on the whole volume."""
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            *deterministic_transforms(WINDOW, pixdim, PAD),
            ScaleIntensityRanged("image", *WINDOW, 0.0, 1.0, clip=True),
        ]
    )


@pytest.fixture(scope="module")
def sources(shared_data, tmp_path_factory):
    """A folder of real CT: two STS NIfTI volumes (symlinks) and the abdominal DICOM series (a copy)."""
    folder = tmp_path_factory.mktemp("sources")
    for case in ("STS_001", "STS_003"):
        os.symlink(shared_data / "sts" / case / "CT_image.nii.gz", folder / f"{case}.nii.gz")
    shutil.copytree(shared_data / "abdomen" / "example_ct_dicom_series", folder / "dicom_series")
    return folder


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    return folder, prepare(str(sources), str(folder), WINDOW, min_size=PAD, num_workers=2)


@pytest.mark.parametrize("pixdim", [None, (1.5, 1.5, 4.0)])
def test_prepared_arrays_equal_the_float32_preprocessing(sources, tmp_path, pixdim):
    items = prepare(str(sources), str(tmp_path), WINDOW, pixdim=pixdim, min_size=PAD)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [os.path.basename(v["source"]) for v in manifest["volumes"]] == [
        "STS_001.nii.gz",
        "STS_003.nii.gz",
        "dicom_series",
    ]
    for item, volume in zip(items, manifest["volumes"]):
        stored = np.load(item["image"], mmap_mode="r")  # slices outermost: (C, z, x, y)
        array = stored.transpose(0, 2, 3, 1)
        assert item["image"].endswith(".zxy.npy") and stored.flags.c_contiguous
        assert array.dtype == np.int16 and list(array.shape) == volume["shape"]
        reference = float32_pipeline(pixdim)({"image": volume["source"]})["image"]
        assert array.shape == reference.shape and all(s >= p for s, p in zip(array.shape[1:], PAD))
        windowed = np.clip((array.astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
        error = np.abs(windowed - reference.numpy()).max()
        assert error <= 0.5 / (WINDOW[1] - WINDOW[0]) + 1e-6, (volume["source"], error)  # int16 rounding of HU
        np.testing.assert_allclose(volume["affine"], reference.affine.numpy(), atol=1e-4)
        if pixdim is not None:
            np.testing.assert_allclose(volume["spacing"], pixdim, atol=1e-4)


def test_boxes_read_from_disk_equal_the_memory_map(prepared, tmp_path):
    _, items = prepared
    rng = np.random.default_rng(0)
    for item in items:
        volume, mapped = PreparedVolume(item["image"]), np.load(item["image"], mmap_mode="r").transpose(0, 2, 3, 1)
        assert volume.shape == mapped.shape and volume.dtype == mapped.dtype
        for _ in range(20):  # boxes, partly out of bounds or empty, and a prefix of the axes
            box = tuple(slice(int(rng.integers(-3, n)), int(rng.integers(-3, n + 4))) for n in mapped.shape)
            np.testing.assert_array_equal(volume[box], mapped[box])
            np.testing.assert_array_equal(volume[box[:2]], mapped[box[:2]])
        np.testing.assert_array_equal(volume[0, ::2, 5], mapped[0, ::2, 5])  # not a box: through the map
    truncated = tmp_path / "truncated.zxy.npy"
    truncated.write_bytes(open(items[0]["image"], "rb").read()[:-4096])
    with pytest.raises(BadInputError, match="truncated.zxy.npy: shorter than its header"):
        PreparedVolume(str(truncated))[:, -2:, -2:, -2:]
    old_layout = tmp_path / "old_layout.npy"  # an array prepared before the slices-outermost layout
    np.save(old_layout, np.asarray(volume))
    with pytest.raises(BadInputError, match="old_layout.npy: not a prepared array of this version"):
        PreparedVolume(str(old_layout))


def test_views_from_a_prepared_volume_equal_views_of_the_float32_volume(prepared):
    folder, items = prepared
    for item in items:
        mapped = LoadPreparedd("image")(item)["image"]
        assert isinstance(mapped, PreparedVolume)
        source = json.loads((folder / "manifest.json").read_text())["volumes"][items.index(item)]["source"]
        volume = float32_pipeline()({"image": source})["image"]
        for seed in range(3):
            views = []
            for image, window in ((mapped, WINDOW), (torch.from_numpy(np.array(mapped)), WINDOW), (volume, None)):
                transform = RandPGLViewsd("image", roi_size=(96, 96, 16), intensity_range=window)
                transform.set_random_state(seed)
                views.append(transform({"image": image}))
            (from_map, in_memory, float32) = views
            for key in ("view1", "view2", "view1_geometry", "view2_geometry"):
                assert torch.equal(from_map[key], in_memory[key]), key
                torch.testing.assert_close(from_map[key], float32[key], atol=0.5 / 1349 + 1e-6, rtol=0)


def test_persistent_workers_see_each_epoch():
    def samples(num_workers: int) -> list[torch.Tensor]:
        dataset = EpochSeededDataset(Dataset([torch.zeros(2)] * 2, Compose([RandGaussianNoise(prob=1.0)])), seed=1)
        loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, persistent_workers=num_workers > 0)
        out = []
        for epoch in (1, 2):
            dataset.set_epoch(epoch)
            out += list(loader)
        return out

    serial, persistent = samples(0), samples(1)
    assert not torch.equal(serial[0], serial[1])
    assert all(torch.equal(a, b) for a, b in zip(serial, persistent))


def prepare_cmd(sources, folder) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pgl_bundle",
        "prepare",
        str(sources),
        str(folder),
        "--num_workers",
        "1",
        "--min_image_size",
        "None",
    ]


Usage = namedtuple("Usage", "total used free")


def test_the_space_needed_is_estimated_from_headers_and_checked_first(prepared, sources, tmp_path, monkeypatch):
    folder, items = prepared
    manifest = json.loads((folder / "manifest.json").read_text())
    for volume in manifest["volumes"]:  # NIfTI and DICOM alike: the stored file's size, within 1 %
        stored = os.path.getsize(folder / volume["array"])
        assert stored <= estimated_bytes(volume["source"], None, PAD) <= 1.01 * stored, volume["source"]
    need = sum(os.path.getsize(item["image"]) for item in items)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - need // 2, need // 2))
    target = tmp_path / "prepared"
    with pytest.raises(DiskSpaceError) as error:
        prepare(str(sources), str(target), WINDOW, min_size=PAD)
    assert str(error.value).startswith(
        f"not enough free disk space: preparing 3 volumes into {target} needs about "
        f"{round((need + (1 << 20)) / 1e6)} MB (int16 arrays, "
        f"estimated from the sources' headers), and its disk ({tmp_path}) has {round(need / 2e6)} MB free."
    )
    assert not target.exists()  # stopped before reading any volume; nothing made


def test_a_disk_that_fills_while_preparing_keeps_no_partial_file(sources, tmp_path, monkeypatch):
    """NumPy reports a short write without an errno (``OSError: 1240932 requested and 466880 written``): with less
    free space than the array needs, that is a full disk. The temporary file goes; the folder stays as it was."""
    real_save, full = np.save, []

    def short_write(f, array, *args, **kwargs):  # half the bytes fit
        full.append(True)
        f.write(b"\x93NUMPY" + bytes(array.nbytes // 2))
        raise OSError(f"{array.nbytes} requested and {array.nbytes // 2} written")

    def disk_usage(path):  # room for everything, until the disk fills
        return Usage(10**12, 10**12 - 10**6, 10**6) if full else Usage(10**12, 0, 10**12)

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    target = tmp_path / "prepared"
    with pytest.raises(DiskSpaceError) as error:  # raised in the preparing process, passed on as it is
        prepare(str(sources / "STS_001.nii.gz"), str(target), WINDOW, min_size=PAD, num_workers=1)
    message = str(error.value)
    assert message.startswith(f"disk full: {target}/STS_001_") and ".zxy.npy: writing 5 MB failed (" in message
    assert "requested and" in message and "written); 1 MB free on that disk. No partial file was left" in message
    assert not target.exists()
    monkeypatch.setattr(np, "save", real_save)


def test_a_killed_prepare_resumes_to_the_same_files(shared_data, tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    for case in range(1, 6):
        os.symlink(shared_data / "sts" / f"STS_{case:03d}" / "CT_image.nii.gz", sources / f"STS_{case:03d}.nii.gz")
    killed, full = tmp_path / "killed", tmp_path / "full"
    # the victim writes its manifest after every volume and takes a second per volume (the STS CTs prepare in
    # 0.1 s), so the kill lands mid-run on any machine; the workers are forked and see the slowed function
    slowed = (
        "import sys, time\n"
        "import pgl_bundle.data.prepared as p\n"
        "prepare_one = p._prepare_one\n"
        "def slow(*args):\n"
        "    time.sleep(1.0)\n"
        "    return prepare_one(*args)\n"
        "p._prepare_one, p._MANIFEST_EVERY_S = slow, 0.0\n"
        "p.prepare(sys.argv[1], sys.argv[2], num_workers=1, min_image_size=None)\n"
    )
    victim = subprocess.Popen(
        [sys.executable, "-c", slowed, str(sources), str(killed)],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes its pool worker too, as a kill of a job does
    )
    deadline = time.time() + 120
    while victim.poll() is None and not (killed / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done = len(json.loads((killed / "manifest.json").read_text())["volumes"])
    assert 0 < done < 5, f"not killed mid-run: {done} of 5 volumes in the manifest"
    resumed = subprocess.run(prepare_cmd(sources, killed), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"preparing {5 - done} of 5 volumes" in resumed.stderr
    prepare(str(sources), str(full), min_image_size=None)  # the defaults, as on the command line
    assert sorted(os.listdir(killed)) == sorted(os.listdir(full))  # no temporaries left
    for name in os.listdir(full):
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name


def test_changed_sources_and_settings_are_prepared_again(shared_data, tmp_path, caplog):
    sources, folder = tmp_path / "sources", tmp_path / "prepared"
    sources.mkdir()
    shutil.copy(shared_data / "sts" / "STS_001" / "CT_image.nii.gz", sources / "a.nii.gz")
    shutil.copy(shared_data / "sts" / "STS_002" / "CT_image.nii.gz", sources / "b.nii.gz")
    caplog.set_level(logging.INFO)
    first = prepare(str(sources), str(folder), WINDOW, min_size=PAD)
    stamps = {item["image"]: os.stat(item["image"]).st_mtime_ns for item in first}
    caplog.clear()
    assert prepare(str(sources), str(folder), WINDOW, min_size=PAD) == first
    assert "preparing" not in caplog.text  # unchanged: nothing read
    assert {item["image"]: os.stat(item["image"]).st_mtime_ns for item in first} == stamps
    shutil.copy(shared_data / "sts" / "STS_004" / "CT_image.nii.gz", sources / "b.nii.gz")
    prepare(str(sources), str(folder), WINDOW, min_size=PAD)
    assert "preparing 1 of 2 volumes" in caplog.text
    reference = float32_pipeline()({"image": str(sources / "b.nii.gz")})["image"]
    assert PreparedVolume(first[1]["image"]).shape == reference.shape  # the header of the new array, not a cached one
    caplog.clear()
    prepare(str(sources), str(folder), (-500, 325), min_size=PAD)
    assert "settings changed" in caplog.text and "preparing 2 of 2 volumes" in caplog.text
    with pytest.raises(ValueError, match=r"other settings \(foreground_above_hu: -500.0 there, -1024.0 here\)"):
        load_prepared(str(folder), WINDOW, min_size=PAD)


def test_a_corrupt_source_is_reported_once_and_left_out(shared_data, tmp_path, caplog):
    sources, folder = tmp_path / "sources", tmp_path / "prepared"
    sources.mkdir()
    os.symlink(shared_data / "sts" / "STS_001" / "CT_image.nii.gz", sources / "good.nii.gz")
    data = (shared_data / "sts" / "STS_002" / "CT_image.nii.gz").read_bytes()
    (sources / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    message = f"{sources / 'broken.nii.gz'}: cannot be read: corrupt, truncated or not an image"
    with pytest.raises(ValueError, match="1 of 2 datalist items cannot be used") as error:
        prepare(str(sources), str(folder), WINDOW, min_size=PAD, skip_bad=False)
    assert message in str(error.value)
    caplog.clear()  # a logging config of an earlier in-process bundle run may have let the first call's lines in
    caplog.set_level(logging.INFO)
    items = prepare(str(sources), str(folder), WINDOW, min_size=PAD)
    assert [os.path.basename(i["image"]).split("_")[0] for i in items] == ["good"]
    assert "preparing" not in caplog.text and message not in caplog.text  # known from the first run: not read again
    assert "leaving out 1 of 2 datalist items, listed in" in caplog.text
    (folder / "manifest.json").unlink()
    caplog.clear()
    prepare(str(sources), str(folder), WINDOW, min_size=PAD)
    assert caplog.text.count(message) == 1


def test_training_prepares_into_a_cache_once(sources, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = {"hu_window": WINDOW, "min_size": PAD, "min_image_size": (96, 96, 16), "num_items": 2}
    first = training_datalist(str(sources), "", "", str(tmp_path / "cache"), **settings)
    assert "no prepared_dir given: using the prepared-data cache" in caplog.text and "preparing 2 of 2" in caplog.text
    caplog.clear()
    assert training_datalist(str(sources), "", "", str(tmp_path / "cache"), **settings) == first
    assert "preparing" not in caplog.text
    assert os.path.dirname(first[0]["image"]).startswith(str(tmp_path / "cache"))


def test_pretraining_on_a_prepared_folder_through_the_bundle(sources, tmp_path):
    folder = tmp_path / "prepared"
    bundle = [sys.executable, "-m", "monai.bundle", "run", "--logging_file", "configs/logging.conf"]
    prepared = subprocess.run(
        bundle
        + [
            "prepare",
            "--config_file",
            "configs/prepare.json",
            "--dataset_dir",
            str(sources),
            "--prepared_dir",
            str(folder),
            "--num_workers",
            "2",
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert len(json.loads((folder / "manifest.json").read_text())["volumes"]) == 3
    tiny = {
        **{k: v for k, v in TINY_PRETRAIN.items() if k != "patch_size"},
        "batch_size": 1,
        "max_epochs": 1,
        "num_workers": 1,
        "num_volumes": 2,
        "volume_repeats": 2,  # each volume twice per epoch: 4 batches of 1
    }
    args = [a for k, v in tiny.items() for a in (f"--{k}", json.dumps(v))]
    run = subprocess.run(
        bundle
        + [
            "training",
            "--config_file",
            "configs/pretrain.json",
            "--bundle_root",
            str(tmp_path / "bundle"),
            "--prepared_dir",
            str(folder),
            *args,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    assert log.count("train_loss:") == 4 and "preparing" not in log
    assert (tmp_path / "bundle" / "models" / "pretrained_encoder.pt").is_file()


def test_prepare_warns_about_volumes_that_are_not_hounsfield_units(shared_data, tmp_path, caplog):
    """Pretraining reads prepared data, so the prepare pass warns per file about an MR-like volume (values 36..3632,
    no air), at every run, and refuses it with require_hu; the real CT beside it passes."""
    import nibabel as nib
    from pgl_bundle.errors import BadInputError

    ct = nib.load(shared_data / "sts" / "STS_001" / "CT_image.nii.gz")
    mr_values = np.round(36 + (np.asarray(ct.dataobj, np.float32) + 1000) * 1.5).astype(np.int16)
    sources = tmp_path / "sources"
    sources.mkdir()
    os.symlink(shared_data / "sts" / "STS_001" / "CT_image.nii.gz", sources / "ct.nii.gz")
    nib.save(nib.Nifti1Image(mr_values, ct.affine), sources / "mr_like.nii.gz")
    expected = f"{sources / 'mr_like.nii.gz'}: intensities {mr_values.min()}..{mr_values.max()} do not look like CT"
    for run in range(2):  # prepared, then read back from the manifest
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            items = prepare(str(sources), str(tmp_path / "prepared"), WINDOW, min_size=PAD)
        assert len(items) == 2 and expected in caplog.text and "ct.nii.gz:" not in caplog.text, run
    with pytest.raises(BadInputError, match="1 of 2 datalist items cannot be used") as error:
        prepare(str(sources), str(tmp_path / "prepared"), WINDOW, min_size=PAD, skip_bad=False, require_hu=True)
    assert expected in str(error.value)
    assert len(prepare(str(sources), str(tmp_path / "prepared"), WINDOW, min_size=PAD, require_hu=True)) == 1


def small_volume(path, array) -> str:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))
    return str(path)


def test_a_2d_file_is_checked_before_the_space_estimate_and_skipped_on_request(tmp_path, caplog):
    """A 2D file among the sources is reported as 2D (not a failed estimate), and left out with skip_bad."""
    sources = tmp_path / "sources"
    sources.mkdir()
    small_volume(sources / "ct.nii.gz", np.full((40, 40, 20), -1000, np.int16))
    flat = small_volume(sources / "flat.nii.gz", np.zeros((40, 40), np.int16))
    settings = {"min_size": (32, 32, 16), "min_image_size": None}
    with pytest.raises(BadInputError) as error:
        prepare(str(sources), str(tmp_path / "refused"), WINDOW, skip_bad=False, **settings)
    first = f"First bad file: {flat}: is a 2D image (shape (40, 40)), a 3D volume is expected"
    assert str(error.value).splitlines()[-1] == first
    with caplog.at_level(logging.WARNING):
        items = prepare(str(sources), str(tmp_path / "prepared"), WINDOW, skip_bad=True, **settings)
    assert [os.path.basename(i["image"]).split("_")[0] for i in items] == ["ct"]
    assert f"leaving out 1 of 2 datalist items:\n  {flat}: is a 2D image" in caplog.text


def test_a_volume_refused_by_require_hu_is_not_prepared(tmp_path):
    """require_hu refuses an MR-like volume before its array is written; without it, it is prepared (and used)."""
    sources, folder = tmp_path / "sources", tmp_path / "prepared"
    sources.mkdir()
    small_volume(sources / "ct.nii.gz", np.full((40, 40, 20), -1000, np.int16))
    small_volume(sources / "mr.nii.gz", np.full((40, 40, 20), 300, np.int16))
    settings = {"min_size": (32, 32, 16), "min_image_size": None}
    assert len(prepare(str(sources), str(folder), WINDOW, require_hu=True, **settings)) == 1
    assert [name.split("_")[0] for name in sorted(os.listdir(folder)) if name.endswith(".npy")] == ["ct"]
    assert len(prepare(str(sources), str(folder), WINDOW, **settings)) == 2
    assert [name.split("_")[0] for name in sorted(os.listdir(folder)) if name.endswith(".npy")] == ["ct", "mr"]
