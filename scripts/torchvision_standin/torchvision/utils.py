"""``make_grid`` and ``save_image``, imported by MONAI Label's image dumps, which a bundle's tasks never call."""


def make_grid(*args, **kwargs):
    """Raise: torchvision is not installed, only this stand-in."""
    raise NotImplementedError("torchvision is a stand-in here (scripts/torchvision_standin)")


save_image = make_grid
