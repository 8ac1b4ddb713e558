"""Settings shared by the tests that run the pretraining bundle: a tiny encoder and heads that train in seconds."""

TINY_PRETRAIN = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_width": [8, 8, 8, 8],
    "patch_size": [32, 32, 16],
    "hidden_channels": 32,
    "embedding_channels": 16,
}

# fine-tuning's network at its smallest (a ResNet-10-like encoder of width 8, a decoder of width 8)
TINY_SEGMENTATION_NETWORK = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [8, 8, 8, 8],
    "decoder_channels": [8, 8, 8, 8, 8],
}
