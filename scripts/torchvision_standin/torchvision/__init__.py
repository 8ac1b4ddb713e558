"""Not torchvision: a stand-in for the two functions MONAI Label imports from ``torchvision.utils`` (see
pyproject.toml beside this folder). MONAI's own optional imports (``torchvision.models``, ``torchvision.transforms``)
still find torchvision absent."""
