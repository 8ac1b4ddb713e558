from .aligner import PriorGuidedAligner, csalign_boxes, flip_align, roi_align_3d
from .dual_path import Branch, DualPathNetwork
from .encoder import PGLResNetEncoder, feature_center_offset
from .heads import ConvProjectionHead, MLPProjectionHead
from .probe import DenseProbe, DenseProbeHead, feature_grid
from .segmentation import SLIDING_WINDOW, DecoderStage, PGLSegmentationNet
