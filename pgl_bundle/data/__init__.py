import os

from .checks import check_checkpoint, check_datalist, check_epoch_length, check_hounsfield, check_image, check_label
from .datalist import IMAGE_SUFFIXES, dicom_series, find_images, load_datalist
from .prepared import (
    LoadPreparedd,
    PreparedVolume,
    deterministic_transforms,
    load_prepared,
    prepare,
    prepared_folder,
    training_datalist,
)
from .synthetic import SYNTHETIC_LABELS, make_synthetic_dataset


def resolve_dataset(dataset_dir: str | None, synthetic_dir: str) -> str:
    """The data source to read: ``dataset_dir``, or the embedded synthetic set (made on first use) when it is empty."""
    return dataset_dir if dataset_dir else make_synthetic_dataset(synthetic_dir)


def synthetic_folder(dataset_dir: str | None, synthetic_dir: str) -> str:
    """The folder :func:`resolve_dataset` writes the synthetic set into; "" when it writes none (``dataset_dir``
    given, or the set made earlier). For :func:`~pgl_bundle.run_folder.check_writable`."""
    made = os.path.isfile(os.path.join(synthetic_dir, "dataset.json"))
    return "" if dataset_dir or made else synthetic_dir
