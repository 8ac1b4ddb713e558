"""pgl-bundle: PGL (Prior-Guided Local) self-supervised pretraining for 3D CT, as a MONAI bundle.

Where each concept of the paper lives:

- view sampling: :mod:`pgl_bundle.views` (geometry) and :mod:`pgl_bundle.intensity`
- encoder: :mod:`pgl_bundle.networks.encoder`; heads: :mod:`pgl_bundle.networks.heads`
- aligner: :mod:`pgl_bundle.networks.aligner`; dual-path module: :mod:`pgl_bundle.networks.dual_path`
- loss: :mod:`pgl_bundle.losses`; EMA momentum: :mod:`pgl_bundle.ema`
- trainer step: MONAI's ``SupervisedTrainer`` fed by :mod:`pgl_bundle.engine`
- data: :mod:`pgl_bundle.data`
"""

from .data import load_datalist, make_synthetic_dataset, resolve_dataset
from .ema import TargetMomentumSchedule, byol_momentum
from .engine import PrepareViews
from .intensity import RandPGLIntensityd
from .losses import ConsistencyLoss, consistency
from .optimizers import LARS
from .views import RandPGLViewsd

from .transfer import FreezeEncoder, export_encoder, load_pretrained_encoder

__version__ = "0.1.0"
