"""Pictures of what PGL does to a volume: both views' crop boxes, the views as the network gets them, and the common
region as the aligner finds it in each view's feature grid.

    python -m pgl_bundle show_views --dataset_dir ../shared/data/sts/dataset.json --output views.png

One row per sample, seven panels, all axial slices ``(x, y)`` through the middle of the two boxes' overlap along
``z``:

1. the source volume (the HU window of pretraining) with view 1's box (orange), view 2's box (cyan) and their
   overlap (green);
2. and 3. view 1 and view 2 as the network gets them: cropped, resized, intensity-augmented and flipped;
4. and 5. each view with its flips undone, drawn in the coordinates of its feature map: the grid lines are the
   feature voxels (the encoder's output stride; the image sits off the grid by the encoder's feature-centre offset)
   and the green box is the overlap as :func:`~pgl_bundle.networks.aligner.csalign_boxes` computes it for the
   aligner: what the loss compares;
6. and 7. that box of each view resampled to the full view size by :class:`~pgl_bundle.networks.PriorGuidedAligner`
   itself, run on the views at stride 1: the same anatomy must appear in both.

The views come from the configuration's own transforms (``train#view_transforms``: the real
:class:`~pgl_bundle.views.RandPGLViewsd` and :class:`~pgl_bundle.intensity.RandPGLIntensityd`), the boxes from
its own aligner (``aligner``). :class:`ViewImagesHandler` puts the same figure into TensorBoard during pretraining.
Matplotlib draws; the figures are built without ``pyplot``'s global state.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.handlers.tensorboard_handlers import TensorBoardHandler
from monai.transforms import Compose

from .data.prepared import MANIFEST, PreparedVolume
from .errors import BadInputError
from .networks.aligner import PriorGuidedAligner, csalign_boxes
from .views import GEOMETRY_END, GEOMETRY_FLIP, GEOMETRY_SCALE, GEOMETRY_START, RandPGLViewsd

__all__ = ["ViewImagesHandler", "ViewSample", "draw_views", "sample_views", "show_views"]

logger = logging.getLogger(__name__)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEW_COLOURS = ("tab:orange", "tab:cyan")
OVERLAP_COLOUR = "lime"
PANELS = ("source", "view1_input", "view2_input", "view1_features", "view2_features", "view1_aligned", "view2_aligned")


@dataclass
class ViewSample:
    """Two views of one volume, with what drawing them needs.

    Attributes:
        name: the source's name (its path's last two parts).
        source: ``(x, y, z)`` first channel of the source volume as the views were cut from it (HU for prepared
            volumes); may be a memory map: only the slice drawn is read.
        display_range: intensities shown from black to white: the views' HU window, else the source's range.
        views: ``(2, X, Y, Z)`` first channel of view 1 and view 2, as the network gets them.
        geometry: ``(2, 4, 3)`` their geometries (:data:`pgl_bundle.views.GEOMETRY_ROWS`).
    """

    name: str
    source: np.ndarray
    display_range: tuple[float, float]
    views: torch.Tensor
    geometry: torch.Tensor


def _source_name(image) -> str:
    """The original file of a prepared volume (from its folder's manifest), else the image's own file name."""
    if isinstance(image, PreparedVolume):
        folder, array = os.path.split(image.filename)
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                sources = {v.get("array"): v["source"] for v in json.load(f)["volumes"]}
        except (OSError, ValueError, KeyError):
            sources = {}
        path = sources.get(array, image.filename)
    elif isinstance(image, MetaTensor):
        path = str(image.meta.get("filename_or_obj", "volume"))
    else:
        path = "volume"
    return os.path.join(*os.path.normpath(path).split(os.sep)[-2:])


def sample_views(item: dict, transforms: Sequence[Callable]) -> ViewSample:
    """Run one datalist item through pretraining's view transforms, keeping the source the views are cut from.

    Args:
        item: a datalist item (``{"image": path}``).
        transforms: the view transforms in order (``train#view_transforms``); one must be a :class:`RandPGLViewsd`.

    Raises:
        ValueError: ``transforms`` holds no :class:`RandPGLViewsd`.
    """
    data, sample = dict(item), None
    for transform in transforms:
        if isinstance(transform, RandPGLViewsd):
            image = data[transform.first_key(data)]
            source = np.asarray(image.as_tensor() if isinstance(image, MetaTensor) else image)[0]
            low_high = transform.intensity_range or (float(np.min(source)), float(np.max(source)))
            sample = (_source_name(image), source, low_high, transform.view_keys)
        data = transform(data)
    if sample is None:
        raise ValueError(f"the view transforms {[type(t).__name__ for t in transforms]} hold no RandPGLViewsd.")
    name, source, display_range, keys = sample
    views = torch.stack([torch.as_tensor(data[key])[0] for key in keys])
    geometry = torch.stack([torch.as_tensor(data[f"{key}_geometry"]) for key in keys])
    return ViewSample(name, source, display_range, views, geometry)


def _slice_index(position: float, size: int) -> int:
    """The voxel holding a continuous coordinate (voxel ``i`` covers ``[i, i + 1)``), kept inside the axis."""
    return int(np.clip(np.floor(position), 0, size - 1))


def _box(ax, start, end, colour: str, gid: str | None = None, **style) -> None:
    """Draw the ``(x, y)`` box ``[start, end)`` on ``ax``."""
    rectangle = Rectangle(
        (float(start[0]), float(start[1])), float(end[0] - start[0]), float(end[1] - start[1]), fill=False, **style
    )
    rectangle.set_edgecolor(colour)
    rectangle.set_gid(gid)
    ax.add_patch(rectangle)


def _image(ax, plane: torch.Tensor | np.ndarray, extent: Sequence[float], value_range: Sequence[float]) -> None:
    """Show an ``(x, y)`` plane with x to the right and y up, spanning ``extent`` (left, right, bottom, top)."""
    low, high = value_range
    image = np.asarray(plane, dtype=np.float32).T
    ax.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=low, vmax=high, interpolation="nearest")


def _draw_source(ax, sample: ViewSample, z_centre: float) -> None:
    """Panel 1: the source slice at ``z_centre`` with both crop boxes and their overlap."""
    geometry = sample.geometry.float()
    starts, ends = geometry[:, GEOMETRY_START], geometry[:, GEOMETRY_END]
    (x, y, z), depth = sample.source.shape, _slice_index(z_centre, sample.source.shape[2])
    ax.set_title(f"{sample.name}\nslice z={depth} of {z}", fontsize=8)
    _image(ax, sample.source[:, :, depth], (0, x, 0, y), sample.display_range)
    for view, colour in enumerate(VIEW_COLOURS):
        _box(ax, starts[view], ends[view], colour, lw=1.2)
    overlap_start, overlap_end = starts.max(dim=0).values, ends.min(dim=0).values
    _box(ax, overlap_start, overlap_end, OVERLAP_COLOUR, gid="source_overlap", lw=1.2, ls="--")


def _draw_view(axes, sample: ViewSample, view: int, z_centre: float, box: torch.Tensor, aligner, matched) -> None:
    """Panels of one view: as input, flips undone on its feature grid with the aligner's ``(2, 3)`` ``box``, and the
    aligner's resampling of its overlap (``matched``, ``(1, 1, X, Y, Z)``)."""
    as_input, on_grid, aligned = axes
    geometry, roi, colour = sample.geometry[view].float(), sample.views.shape[1:], VIEW_COLOURS[view]
    flips = geometry[GEOMETRY_FLIP] != 0
    depth = _slice_index((z_centre - float(geometry[GEOMETRY_START, 2])) * float(geometry[GEOMETRY_SCALE, 2]), roi[2])
    flipped = "".join(a for a, f in zip("xyz", flips) if f) or "none"
    size = "x".join(str(int(s)) for s in (geometry[GEOMETRY_END] - geometry[GEOMETRY_START]).tolist())
    as_input.set_title(f"view {view + 1} as input\ncrop {size}, flips: {flipped}", fontsize=8, color=colour)
    input_depth = roi[2] - 1 - depth if flips[2] else depth
    _image(as_input, sample.views[view, :, :, input_depth], (0, roi[0], 0, roi[1]), (0, 1))

    # flips undone, in feature coordinates f = (u - mirror * offset) / stride (csalign_boxes' mapping)
    unflipped = torch.flip(sample.views[view], [a for a in range(3) if flips[a]])
    stride, offset = torch.tensor(aligner.output_stride), torch.tensor(aligner.feature_offset)
    mirror = 1 - 2 * flips.float()
    low = (-mirror * offset / stride).tolist()
    high = ((torch.tensor(roi) - mirror * offset) / stride).tolist()
    _image(on_grid, unflipped[:, :, depth], (low[0], high[0], low[1], high[1]), (0, 1))
    _box(on_grid, box[0], box[1], OVERLAP_COLOUR, gid="aligner_box", lw=1.5)
    grid = [int(n) // int(s) for n, s in zip(roi, stride)]
    on_grid.set_xticks(range(grid[0] + 1))
    on_grid.set_yticks(range(grid[1] + 1))
    on_grid.grid(True, color="white", lw=0.6, alpha=0.6)
    on_grid.set_xlim(min(low[0], 0), max(high[0], grid[0]))
    on_grid.set_ylim(min(low[1], 0), max(high[1], grid[1]))
    on_grid.tick_params(labelsize=6)
    on_grid.set_title(
        f"view {view + 1}, flips undone, on its\n{grid[0]}x{grid[1]}x{grid[2]} feature grid; "
        f"box z {float(box[0, 2]):.2f}-{float(box[1, 2]):.2f}",
        fontsize=8,
        color=colour,
    )

    _image(aligned, matched[0, 0, :, :, roi[2] // 2], (0, roi[0], 0, roi[1]), (0, 1))
    aligned.set_title(f"overlap of view {view + 1},\nresampled by the aligner", fontsize=8, color=colour)


def _draw_sample(axes, sample: ViewSample, aligner: PriorGuidedAligner) -> None:
    """One row: the panels of :data:`PANELS`."""
    geometry = sample.geometry.float()
    z_centre = float(geometry[:, GEOMETRY_START, 2].max() + geometry[:, GEOMETRY_END, 2].min()) / 2
    boxes = csalign_boxes(geometry[:1], geometry[1:], aligner.output_stride, aligner.feature_offset)
    # the same aligner at stride 1 on the views themselves: each view's overlap resampled to the full view size
    matched = PriorGuidedAligner((1, 1, 1))(*sample.views[:, None, None], geometry[:1], geometry[1:])
    _draw_source(axes[0], sample, z_centre)
    for view in range(2):
        _draw_view(axes[1 + view :: 2], sample, view, z_centre, boxes[view][0], aligner, matched[view])
    for name, ax in zip(PANELS, axes):
        ax.set_gid(name)  # how tests find a panel
        if not name.endswith("_features"):
            ax.set_xticks([])
            ax.set_yticks([])


def draw_views(samples: Sequence[ViewSample], aligner: PriorGuidedAligner) -> Figure:
    """One row of seven panels per sample (see the module docstring).

    Args:
        samples: from :func:`sample_views`.
        aligner: pretraining's aligner; its ``output_stride`` and ``feature_offset`` place the feature grid and boxes.

    Returns:
        a matplotlib ``Figure`` (no ``pyplot``): ``figure.savefig(path)`` or ``SummaryWriter.add_figure``.
    """
    if not samples:
        raise ValueError("draw_views: no samples to draw.")
    figure = Figure(figsize=(2.3 * len(PANELS), 2.7 * len(samples) + 0.5), layout="constrained")
    axes = figure.subplots(len(samples), len(PANELS), squeeze=False)
    for row, sample in zip(axes, samples):
        _draw_sample(row, sample, aligner)
    figure.suptitle(
        "orange: view 1's crop box, cyan: view 2's, green: their overlap (the region the loss compares); "
        "axial slices through the overlap's middle, x to the right, y up",
        fontsize=9,
    )
    return figure


class ViewImagesHandler(TensorBoardHandler):
    """Every ``interval`` iterations, draw fresh views of ``num_samples`` volumes into TensorBoard (image ``tag``).

    The views are made by deep copies of pretraining's view transforms, seeded with ``seed``, and the volumes
    drawn by a generator of the handler's own: training's transforms and random state are not touched, so a run
    trains the same with or without this handler. A figure of 2 volumes takes 1-2 s of the main process.

    Args:
        datalist: pretraining's datalist (``train#datalist``).
        transforms: pretraining's view transforms (``train#view_transforms``); copied, not used.
        aligner: pretraining's aligner (``aligner``).
        interval: iterations between pictures.
        num_samples: volumes (rows) per picture.
        seed: seed of the copies' transforms and of the choice of volumes.
        summary_writer: a TensorBoard writer to share; by default one is created in ``log_dir``.
        log_dir: where a new writer writes.
        tag: the TensorBoard image tag.
    """

    def __init__(
        self,
        datalist: Sequence[dict],
        transforms: Sequence[Callable],
        aligner: PriorGuidedAligner,
        interval: int,
        num_samples: int = 2,
        seed: int = 0,
        summary_writer=None,
        log_dir: str = "./runs",
        tag: str = "views",
    ) -> None:
        if interval < 1:
            raise ValueError(f"ViewImagesHandler: interval must be a positive number of iterations, got {interval}.")
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.datalist, self.aligner, self.interval, self.tag = list(datalist), aligner, interval, tag
        self.num_samples = min(num_samples, len(self.datalist))
        self.transforms = Compose(copy.deepcopy(list(transforms))).set_random_state(seed)
        self.rng = np.random.default_rng(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        chosen = self.rng.choice(len(self.datalist), self.num_samples, replace=False)
        samples = [sample_views(self.datalist[i], self.transforms.transforms) for i in chosen]
        self._writer.add_figure(self.tag, draw_views(samples, self.aligner), engine.state.iteration)
        self._writer.flush()


def show_views(
    dataset_dir: str = "",
    output: str = "views.png",
    num_samples: int = 3,
    seed: int = 0,
    prepared_dir: str = "",
    config_file: str | Sequence[str] = "configs/pretrain.json",
    dpi: int = 110,
    **overrides,
) -> str:
    """Draw PGL's views of the first ``num_samples`` volumes of a data set into ``output`` (see the module docstring).

    Args:
        dataset_dir: as pretraining's ``dataset_dir`` (a dataset.json, folder or glob); empty: the synthetic set.
        output: the picture's path (``.png``, ``.pdf``, ``.svg``: any format matplotlib writes); folders are made.
        num_samples: volumes to draw, one row each.
        seed: seed of the views' random crops, flips and intensity changes.
        prepared_dir: a folder written by the prepare stage, read instead of preparing ``dataset_dir``.
        config_file: pretraining config(s), relative to the bundle folder or absolute; the views, window and
            aligner are theirs.
        dpi: the picture's resolution.
        overrides: any other config key, e.g. ``--patch_size "[64,64,16]"`` or ``--hu_window "[-1000,400]"``.

    Returns:
        ``output``.
    """
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    parser = ConfigParser()
    parser.read_config([f if os.path.isabs(f) else os.path.join(_ROOT, f) for f in files])
    with tempfile.TemporaryDirectory(prefix="pgl_show_views_") as scratch:  # synthetic set and prepared arrays
        parser.update(
            {
                **overrides,
                "bundle_root": scratch,
                "dataset_dir": dataset_dir,
                "prepared_dir": prepared_dir,
                "num_volumes": num_samples,
                "device": "$torch.device('cpu')",
            }
        )
        datalist = parser.get_parsed_content("train#datalist")
        transforms = Compose(parser.get_parsed_content("train#view_transforms")).set_random_state(seed)
        samples = [sample_views(item, transforms.transforms) for item in datalist[:num_samples]]
        if not samples:
            raise BadInputError(f"{dataset_dir or prepared_dir}: no volume to draw.")
        figure = draw_views(samples, parser.get_parsed_content("aligner"))
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        figure.savefig(output, dpi=dpi)
    logger.info(f"wrote {output}: the views of {len(samples)} volumes ({', '.join(s.name for s in samples)})")
    return output
