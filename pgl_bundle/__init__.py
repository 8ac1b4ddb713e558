"""pgl-bundle: PGL (Prior-Guided Local) self-supervised pretraining for 3D CT, as a MONAI bundle.

Where each concept of the paper lives:

- view sampling: :mod:`pgl_bundle.views` (geometry) and :mod:`pgl_bundle.intensity`
- encoder: :mod:`pgl_bundle.networks.encoder`; heads: :mod:`pgl_bundle.networks.heads`
- aligner: :mod:`pgl_bundle.networks.aligner`; dual-path module: :mod:`pgl_bundle.networks.dual_path`
- loss: :mod:`pgl_bundle.losses`; EMA momentum: :mod:`pgl_bundle.ema`
- trainer step: MONAI's ``SupervisedTrainer`` fed by :mod:`pgl_bundle.engine`; its speed: :mod:`pgl_bundle.throughput`
- what pretraining does to the data: pictures of the views :mod:`pgl_bundle.show_views`; collapse signal
  :mod:`pgl_bundle.collapse`; dense probe during pretraining :mod:`pgl_bundle.validation_probe`
- downstream network: :mod:`pgl_bundle.networks.segmentation`; weight transfer: :mod:`pgl_bundle.transfer`; how the
  pretrained encoder is fine-tuned: :mod:`pgl_bundle.finetuning`
- data and its checks: :mod:`pgl_bundle.data`; prepared once, memory-mapped: :mod:`pgl_bundle.data.prepared`
- evaluation: the dense probe :mod:`pgl_bundle.networks.probe`; the experiments (comparison across transfer
  strategies and label budgets, probe curve, fine-tuning sanity bar, paired bootstrap): :mod:`pgl_bundle.experiments`
- resume and multi-process runs: :mod:`pgl_bundle.handlers`, :mod:`pgl_bundle.distributed`
- one run per output folder: :mod:`pgl_bundle.run_folder`; errors the user fixes: :mod:`pgl_bundle.errors`
- publishing weights: :mod:`pgl_bundle.release`; where an encoder came from: :mod:`pgl_bundle.provenance`
"""

from .collapse import CollapseSignalHandler, collapse_signal
from .data import (
    LoadPreparedd,
    check_checkpoint,
    check_datalist,
    check_epoch_length,
    load_datalist,
    make_synthetic_dataset,
    prepare,
    resolve_dataset,
    training_datalist,
)
from .distributed import EpochSeededDataset, ResumableSampler
from .ema import ForeachEMAHandler, TargetMomentumSchedule, byol_momentum
from .engine import NoLossScalingForBF16, PrepareViews
from .errors import UserError, report_user_errors_last
from .finetuning import TransferHandler, TransferSchedule
from .handlers import AtomicCheckpointSaver, SkipTrainedBatches, check_free_space, latest_checkpoint, resolve_resume
from .intensity import RandPGLIntensityd
from .losses import ConsistencyLoss, consistency
from .optimizers import LARS
from .release import require_weights
from .run_folder import RunFolder
from .throughput import ThroughputHandler
from .transfer import export_encoder, load_pretrained_encoder
from .validation_probe import ValidationProbe
from .views import RandPGLViewsd

__version__ = "0.1.0"
