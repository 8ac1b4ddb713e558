"""``torch.compile`` of the pretraining step (inductor, on CPU): the same loss, gradients and BatchNorm statistics
as the eager step, and a compiled run's checkpoints load into eager networks (no ``_orig_mod.`` prefixes).

Tolerance: float32 throughout; inductor fuses and reorders reductions, so results agree to rounding, not bit for
bit: loss within 1e-5 relative, each gradient within 1e-3 of its largest magnitude (measured worst: 3e-4, a bias
gradient summed over every voxel; see the test for the zero gradients of biases followed by BatchNorm).

Cost: compiling forward and backward took 58 CPU-seconds with inductor's caches off (a tiny encoder; the graph's
size, not the tensors', sets it); with its on-disk cache warm the whole test took 41-68 s wall on 2 CPU cores
under a load average above 10 (not measured on idle cores).
"""

from __future__ import annotations

import torch
from monai.bundle import ConfigParser
from pgl_bundle.data import make_synthetic_dataset
from pgl_bundle.networks import PGLResNetEncoder

TINY = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_width": [8, 8, 8, 8],
    "encoder_block": "basic",
    "patch_size": [32, 32, 16],
    "hidden_channels": 16,
    "embedding_channels": 8,
    "num_workers": 0,
    "batch_size": 2,
    "max_epochs": 2,
    "device": "$torch.device('cpu')",
}


def _parser(repo_root, bundle_root, data: str, compile: bool) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "pretrain.json"))
    parser.update({**TINY, "bundle_root": str(bundle_root), "dataset_dir": data, "compile": compile})
    return parser


def test_compiled_step_matches_eager_and_checkpoints_load_into_eager(repo_root, tmp_path):
    torch.manual_seed(0)
    data = make_synthetic_dataset(str(tmp_path / "data"), 2, shape=(48, 48, 24))
    eager, compiled = (_parser(repo_root, tmp_path / name, data, name == "compiled") for name in ("eager", "compiled"))
    trainer = compiled.get_parsed_content("train#trainer")
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule), "compile is not on"
    eager_net, compiled_net = eager.get_parsed_content("network"), compiled.get_parsed_content("network")
    compiled_net.load_state_dict(eager_net.state_dict())  # an eager state loads into the compiled run's network
    batch = next(iter(eager.get_parsed_content("train#dataloader")))
    view1, _, (view2, geometry1, geometry2), _ = eager.get_parsed_content("train#prepare_batch")(batch, "cpu")
    loss_fn = eager.get_parsed_content("loss")
    losses = []
    for forward in (eager_net, trainer.network):  # trainer.network: the compiled wrapper of compiled_net
        loss = loss_fn(forward(view1, view2, geometry1, geometry2))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    grads = {
        name: (p.grad, q.grad)
        for (name, p), q in zip(eager_net.named_parameters(), compiled_net.parameters())
        if p.grad is not None
    }
    largest = max(float(e.abs().max()) for e, _ in grads.values())
    # each gradient within 1e-3 of its own largest entry; a bias followed by BatchNorm has a zero gradient in exact
    # arithmetic (the normalisation removes it), whose rounding noise is measured against the network's largest
    errors = {
        name: float((c - e).abs().max()) / (float(e.abs().max()) + 1e-3 * largest) for name, (e, c) in grads.items()
    }
    worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
    assert worst[0][1] < 1e-3, worst
    for (name, b), c in zip(eager_net.named_buffers(), compiled_net.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)

    compiled.get_parsed_content("training")  # two compiled training iterations with the run's savers
    models = tmp_path / "compiled" / "models"
    encoder_state = torch.load(models / "pretrained_encoder.pt", map_location="cpu", weights_only=True)
    network_state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=False)["network"]
    assert not [k for k in [*encoder_state, *network_state] if "_orig_mod" in k]
    encoder = PGLResNetEncoder(layers=TINY["encoder_layers"], block="basic", block_inplanes=TINY["encoder_width"])
    encoder.load_state_dict(encoder_state, strict=True)
    eager_net.load_state_dict(network_state, strict=True)
    torch.testing.assert_close(eager_net.online.encoder.conv1.weight, compiled_net.online.encoder.conv1.weight)
