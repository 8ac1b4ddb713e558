"""Weight transfer: a real pretraining checkpoint into the segmentation network, the clear errors, the MONAI export."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import FlexibleUNet, ResNet, UNet
from pgl_bundle.errors import BadInputError
from pgl_bundle.networks import PGLResNetEncoder, PGLSegmentationNet
from pgl_bundle.transfer import PLAN_DEFAULTS, adaptation_plan, export_encoder, load_pretrained_encoder, write_plan

LAYERS = [1, 1, 1, 1]  # the pretraining config's encoder, at its default widths and block, one block per stage


def pretrain(repo_root, shared_data, bundle_root, *overlays: str):
    """models/ of one short run of configs/pretrain.json (and overlays) on a real CT."""
    configs = [str(repo_root / "configs" / name) for name in ("pretrain.json", *overlays)]
    workflow = ConfigWorkflow(
        config_file=configs,
        workflow_type="train",
        bundle_root=str(bundle_root),
        logging_file=False,
        dataset_dir=str(shared_data / "sts"),
        num_volumes=1,
        max_epochs=1,
        batch_size=1,
        num_workers=0,
        encoder_layers=LAYERS,
        patch_size=[64, 64, 16],
        hidden_channels=64,
        embedding_channels=32,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return bundle_root / "models"


@pytest.fixture(scope="module")
def pretrained(repo_root, shared_data, tmp_path_factory):
    """PGL pretraining."""
    return pretrain(repo_root, shared_data, tmp_path_factory.mktemp("pgl"))


@pytest.fixture(scope="module")
def pretrained_byol(repo_root, shared_data, tmp_path_factory):
    """The BYOL baseline's pretraining (configs/pretrain_byol.json): the same encoder, other heads."""
    return pretrain(repo_root, shared_data, tmp_path_factory.mktemp("byol"), "pretrain_byol.json")


def segmentation_net(repo_root, **overrides) -> PGLSegmentationNet:
    """``network_def`` of configs/train.json: what the bundle fine-tunes."""
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "train.json"))
    parser.update({"encoder_layers": LAYERS, "label_names": ["background", "tumour"], **overrides})
    return parser.get_parsed_content("network_def")


@pytest.fixture(params=["pretrained", "pretrained_byol"])
def any_pretrained(request):
    """PGL's and BYOL's pretraining output, in turn."""
    return request.getfixturevalue(request.param)


def test_pretraining_checkpoint_loads_one_to_one(any_pretrained, repo_root, caplog):
    checkpoint = any_pretrained / "pretrained_encoder.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = segmentation_net(repo_root)
    assert any(not torch.equal(net.encoder.state_dict()[k], v) for k, v in state.items() if v.is_floating_point())
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoder.")}

    with caplog.at_level(logging.INFO, logger="pgl_bundle.transfer"):
        assert load_pretrained_encoder(net, checkpoint) is net

    encoder_state = net.encoder.state_dict()
    assert encoder_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(encoder_state[name], tensor), name
    for name, tensor in net.state_dict().items():  # the decoder is new: untouched
        if name in decoder_before:
            assert torch.equal(tensor, decoder_before[name]), name
    assert f"{len(state)} of {len(state)} encoder tensors matched, missing: [], unexpected: []" in caplog.text


def test_config_switch_loads_the_checkpoint_or_nothing(pretrained, repo_root):
    checkpoint = pretrained / "pretrained_encoder.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "train.json"))
    parser.update({"encoder_layers": LAYERS, "device": "$torch.device('cpu')", "pretrained_encoder": str(checkpoint)})
    loaded = parser.get_parsed_content("network").encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    parser.update({"pretrained_encoder": ""})
    parser.parse()
    random = parser.get_parsed_content("network").encoder.state_dict()
    assert not all(torch.equal(random[k], v) for k, v in state.items())


def test_empty_path_keeps_random_weights(repo_root):
    net = segmentation_net(repo_root)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for empty in ("", None):
        assert load_pretrained_encoder(net, empty) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_missing_file_is_named(repo_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.pt'}: encoder checkpoint not found"):
        load_pretrained_encoder(segmentation_net(repo_root), tmp_path / "nope.pt")


def test_corrupted_checkpoint_is_refused(pretrained, repo_root, tmp_path):
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes((pretrained / "pretrained_encoder.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{corrupted}: not an encoder checkpoint, torch.load failed"):
        load_pretrained_encoder(segmentation_net(repo_root), corrupted)


def test_training_checkpoint_is_not_an_encoder_checkpoint(pretrained, repo_root, tmp_path):
    """The full pretraining checkpoint (network, optimizer, ...) or any non-tensor content is refused."""
    for path, content in (
        (pretrained / "checkpoints" / "checkpoint_final.pt", None),
        (tmp_path / "dict.pt", {"network": {"conv1.weight": torch.zeros(1)}, "epoch": 3}),
    ):
        if content is not None:
            torch.save(content, path)
        with pytest.raises(ValueError, match=f"{path}: not an encoder checkpoint"):
            load_pretrained_encoder(segmentation_net(repo_root), path)


def test_foreign_checkpoint_matches_nothing(repo_root, tmp_path):
    foreign = tmp_path / "unet.pt"
    torch.save(UNet(3, 1, 2, channels=(4, 8), strides=(2,)).state_dict(), foreign)
    with pytest.raises(ValueError, match=f"{foreign}: no tensor name matches the network's"):
        load_pretrained_encoder(segmentation_net(repo_root), foreign)


def test_prefixed_checkpoint_names_the_prefix(pretrained, repo_root, tmp_path):
    """A state_dict of a network around the encoder (the dual-path network here) is refused, its prefix named."""
    dual_path = tmp_path / "dual_path.pt"
    checkpoint = torch.load(pretrained / "checkpoints" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    torch.save(checkpoint["network"], dual_path)
    with pytest.raises(ValueError, match="no tensor name matches.*behind the prefix 'online.encoder.'"):
        load_pretrained_encoder(segmentation_net(repo_root), dual_path)


def test_shape_mismatch_names_the_tensors(pretrained, repo_root):
    with pytest.raises(ValueError, match=r"23 tensor shape\(s\) differ.*layer2.0.bn1.bias: \(128,\) vs \(96,\)"):
        load_pretrained_encoder(
            segmentation_net(repo_root, encoder_width=[64, 96, 256, 512]), pretrained / "pretrained_encoder.pt"
        )


def test_partial_match_is_refused_unless_not_strict(pretrained, repo_root, caplog):
    checkpoint = pretrained / "pretrained_encoder.pt"
    deeper = segmentation_net(repo_root, encoder_layers=[2, 1, 1, 1])  # layer1.1.* is not in the checkpoint
    with pytest.raises(
        ValueError,
        match=r"does not fit the encoder: 106 of 124 encoder tensors matched, missing: \["
        r"layer1.1.bn1.bias",
    ):
        load_pretrained_encoder(deeper, checkpoint)
    with caplog.at_level(logging.WARNING, logger="pgl_bundle.transfer"):
        load_pretrained_encoder(deeper, checkpoint, strict=False)
    assert "106 of 124 encoder tensors matched" in caplog.text
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.equal(deeper.encoder.state_dict()[k], v) for k, v in state.items())


def test_export_into_monai_resnet_is_exact(pretrained):
    """With the PGL stem and no max pooling, MONAI's ResNet loads every tensor and computes the same features."""
    checkpoint = pretrained / "pretrained_encoder.pt"
    resnet = ResNet(
        "bottleneck",
        LAYERS,
        [64, 128, 256, 512],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=(7, 7, 3),
        conv1_t_stride=(2, 2, 1),
        no_max_pool=True,
        feed_forward=False,
    )
    resnet.load_state_dict(export_encoder(checkpoint, resnet))
    encoder = PGLResNetEncoder(layers=LAYERS)
    encoder.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(x), encoder.eval()(x)[-1].mean(dim=(2, 3, 4)))


def test_export_into_flexible_unet_where_shapes_allow(pretrained, tmp_path, caplog):
    checkpoint = pretrained / "pretrained_encoder.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    unet = FlexibleUNet(in_channels=1, out_channels=2, backbone="resnet50", spatial_dims=3)
    own = {k: v.clone() for k, v in unet.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="pgl_bundle.transfer"):
        exported = export_encoder(checkpoint, unet, tmp_path / "flexible_unet.pt")
    assert exported.keys() == own.keys()
    assert torch.equal(
        torch.load(tmp_path / "flexible_unet.pt", weights_only=True)["encoder.bn1.weight"], state["bn1.weight"]
    )
    unet.load_state_dict(exported)  # strict: a complete state
    after = unet.state_dict()
    # left out: the (7, 7, 3) stem kernel (FlexibleUNet's is 7x7x7) and the shortcut biases (its ResNet has none)
    left_out = {"conv1.weight"} | {f"layer{i}.0.downsample.0.bias" for i in range(1, 5)}
    assert torch.equal(after["encoder.conv1.weight"], own["encoder.conv1.weight"])
    assert not any(f"encoder.{name}" in after for name in left_out - {"conv1.weight"})
    for name, tensor in state.items():
        if name not in left_out:
            assert torch.equal(after[f"encoder.{name}"], tensor), name
    assert "exported 101 of 106 encoder tensors to FlexibleUNet 'encoder.*'" in caplog.text
    assert "conv1.weight (64, 1, 7, 7, 3) vs (64, 1, 7, 7, 7)" in caplog.text
    assert "layer1.0.downsample.0.bias" in caplog.text


def test_export_refuses_a_network_without_resnet(pretrained):
    with pytest.raises(ValueError, match="UNet holds no monai.networks.nets.ResNet"):
        export_encoder(pretrained / "pretrained_encoder.pt", UNet(3, 1, 2, channels=(4, 8), strides=(2,)))


def test_pretraining_writes_its_adaptation_plan(pretrained):
    plan = json.loads((pretrained / "pretrained_encoder.json").read_text())
    record = plan.pop("pretraining")
    assert plan == {
        **PLAN_DEFAULTS,
        "encoder_layers": LAYERS,
        "patch_size": [64, 64, 16],
    }
    final = torch.load(pretrained / "checkpoints" / "checkpoint_final.pt", weights_only=True)["trainer"]["iteration"]
    assert record["iteration"] == final and record["data"]["num_volumes"] > 0


def test_fine_tuning_builds_the_encoder_of_the_plan(pretrained, repo_root):
    """Only --pretrained_encoder is given: the plan's one-block-per-stage encoder is built and loads."""
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "train.json"))
    parser.update({"device": "$torch.device('cpu')", "pretrained_encoder": str(pretrained / "pretrained_encoder.pt")})
    net = parser.get_parsed_content("network")
    assert [len(getattr(net.encoder, f"layer{i}")) for i in range(1, 5)] == LAYERS
    assert parser.get_parsed_content("plan") == {**PLAN_DEFAULTS, "encoder_layers": LAYERS}


@pytest.mark.parametrize(
    ("key", "value", "planned"),
    [("encoder_width", [32, 64, 128, 256], "[64, 128, 256, 512]"), ("hu_window", [-1024, 325], "[-200, 300]")],
)
def test_a_setting_contradicting_the_plan_is_refused_with_the_plans_value(pretrained, key, value, planned):
    checkpoint = pretrained / "pretrained_encoder.pt"
    message = f"--{key} {re.escape(json.dumps(value))} contradicts the adaptation plan .* {key} = {re.escape(planned)}"
    with pytest.raises(BadInputError, match=message):
        adaptation_plan(checkpoint, **{key: value})
    assert adaptation_plan(checkpoint, encoder_layers=LAYERS)["encoder_layers"] == LAYERS  # agreeing: fine


def test_without_a_plan_the_given_settings_and_the_defaults_apply(tmp_path):
    assert adaptation_plan("") == PLAN_DEFAULTS
    assert adaptation_plan(tmp_path / "no_plan.pt", pixdim=(1.0, 1.0, 3.0))["pixdim"] == [1.0, 1.0, 3.0]


def test_a_broken_plan_is_named(tmp_path):
    (tmp_path / "encoder.json").write_text('{"encoder_layers": [1, 1, 1, 1]}')
    with pytest.raises(BadInputError, match=re.escape(f"{tmp_path / 'encoder.json'}: the adaptation plan lacks")):
        adaptation_plan(tmp_path / "encoder.pt")


def test_a_wrong_encoder_file_is_the_last_line_and_comes_before_any_data_is_read(repo_root, tmp_path):
    """A MONAI UNet's weights as --pretrained_encoder, and a dataset that does not exist: the run stops on the
    encoder (so before reading data), with the file named in the last line it prints."""
    wrong = tmp_path / "unet.pt"
    torch.save(UNet(3, 1, 2, channels=(4, 8), strides=(2,)).state_dict(), wrong)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(repo_root / "configs" / "train.json")]
    cmd += [
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(tmp_path / "no_data"),
        "--pretrained_encoder",
        str(wrong),
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    last = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-1]
    assert result.returncode != 0 and str(wrong) in last and "no tensor name matches" in last, last
    assert f"{tmp_path / 'no_data'}:" not in result.stdout + result.stderr  # no error about the data: not read


def test_the_probe_and_evaluation_read_the_plan(pretrained, repo_root, tmp_path):
    """The probe builds its encoder from the encoder file's plan; evaluation from the plan fine-tuning wrote."""
    configs = [str(repo_root / "configs" / c) for c in ("train.json", "evaluate.json", "probe.json")]
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update({"pretrained_encoder": str(pretrained / "pretrained_encoder.pt")})
    assert parser.get_parsed_content("plan")["encoder_layers"] == LAYERS
    parser = ConfigParser()
    parser.read_config(configs[:2])
    (tmp_path / "models").mkdir()
    write_plan(tmp_path / "models" / "model.pt", {**PLAN_DEFAULTS, "encoder_width": [8, 8, 16, 16]})
    parser.update({"bundle_root": str(tmp_path)})
    assert parser.get_parsed_content("encoder").out_channels[-1] == 16 * 4
