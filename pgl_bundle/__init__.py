"""pgl-bundle: PGL (Prior-Guided Local) self-supervised pretraining for 3D CT, as a MONAI bundle.

Where each concept of the paper lives:

- view sampling: :mod:`pgl_bundle.views` (geometry) and :mod:`pgl_bundle.intensity`
- encoder: :mod:`pgl_bundle.networks.encoder`; heads: :mod:`pgl_bundle.networks.heads`
- aligner: :mod:`pgl_bundle.networks.aligner`; dual-path module: :mod:`pgl_bundle.networks.dual_path`
- loss: :mod:`pgl_bundle.losses`; EMA momentum: :mod:`pgl_bundle.ema`
- trainer step: MONAI's ``SupervisedTrainer`` fed by :mod:`pgl_bundle.engine`
- downstream network: :mod:`pgl_bundle.networks.segmentation`; weight transfer: :mod:`pgl_bundle.transfer`
- data and its checks: :mod:`pgl_bundle.data`
- resume and multi-process runs: :mod:`pgl_bundle.handlers`, :mod:`pgl_bundle.distributed`
- publishing weights: :mod:`pgl_bundle.release`
"""

from .data import check_checkpoint, check_datalist, load_datalist, make_synthetic_dataset, resolve_dataset
from .distributed import EpochSeededDataset, ResumableSampler
from .ema import TargetMomentumSchedule, byol_momentum
from .engine import PrepareViews
from .handlers import AtomicCheckpointSaver, SkipTrainedBatches, latest_checkpoint, resolve_resume
from .intensity import RandPGLIntensityd
from .losses import ConsistencyLoss, consistency
from .optimizers import LARS
from .release import require_weights
from .transfer import FreezeEncoder, export_encoder, load_pretrained_encoder
from .views import RandPGLViewsd

__version__ = "0.1.0"
