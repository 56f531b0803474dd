"""ResNet backbone: parity with torchvision, detectron2 pickle loading, strides, freezing."""

import pickle
import re

import pytest
import torch
import torchvision

from freeseg.errors import CheckpointError
from freeseg.presets import get_preset
from freeseg.modeling.backbone import FrozenBatchNorm2d, ResNet, build_backbone, load_detectron2_resnet, load_torchvision_resnet

torch.set_num_threads(1)

# Our names -> detectron2's: the inverse of backbone.DETECTRON2_RESNET_RENAMES, written out
# independently so that a wrong rule in the loader cannot cancel itself out.
TO_DETECTRON2 = [
    (r"^layer1\.", "res2."), (r"^layer2\.", "res3."), (r"^layer3\.", "res4."), (r"^layer4\.", "res5."),
    (r"\.downsample\.0\.weight$", ".shortcut.weight"),
    (r"\.downsample\.1\.", ".shortcut.norm."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
]
TO_DETECTRON2_BASIC_STEM = [(r"^conv1\.weight$", "stem.conv1.weight"), (r"^bn1\.", "stem.conv1.norm.")]


def to_detectron2(name: str, stem: str) -> str:
    for pattern, repl in (TO_DETECTRON2_BASIC_STEM if stem == "basic" else []) + TO_DETECTRON2:
        name = re.sub(pattern, repl, name)
    return name


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (the random init has
    mean 0, var 1, weight 1, bias 0, under which a misnamed norm would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def torchvision_stages(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("depth,norm", [(50, "frozen_bn"), (18, "bn")])
def test_matches_torchvision(depth, norm):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    randomize_norms(ref)
    ours = ResNet(depth=depth, stem="basic", norm=norm).eval()
    load_torchvision_resnet(ours, ref.state_dict())  # strict=True inside, fc.* dropped
    x = torch.randn(2, 3, 64, 96)
    # float64: the same arithmetic up to rounding, so any difference is a wiring mistake.
    with torch.no_grad():
        got = ours.double()(x.double())
        want = torchvision_stages(ref.double(), x.double())
    for name, w in zip(("res2", "res3", "res4", "res5"), want):
        assert got[name].shape == w.shape
        assert (got[name] - w).abs().max().item() < 1e-5, name
    # float32: frozen BN folds mean/var into one scale and shift, so rounding differs slightly;
    # random-init activations reach ~10, hence a relative bound.
    with torch.no_grad():
        got = ours.float()(x)
        want = torchvision_stages(ref.float(), x)
    for name, w in zip(("res2", "res3", "res4", "res5"), want):
        assert (got[name] - w).abs().max().item() < 1e-5 * max(1.0, w.abs().max().item()), name
    widths = [64, 128, 256, 512]
    expansion = 4 if depth == 50 else 1
    assert ours.out_channels == {f"res{k + 2}": w * expansion for k, w in enumerate(widths)}


def test_torchvision_load_is_strict():
    ours = ResNet(depth=18, stem="basic")
    state = torchvision.models.resnet18(weights=None).state_dict()
    state.pop("layer2.0.downsample.0.weight")
    with pytest.raises(CheckpointError, match="layer2.0.downsample.0.weight"):
        load_torchvision_resnet(ours, state)


@pytest.mark.parametrize("depth,stem", [(50, "deeplab"), (18, "basic")])
def test_detectron2_pickle_round_trip(tmp_path, depth, stem):
    torch.manual_seed(0)
    src = ResNet(depth=depth, stem=stem, width=8, res5_multi_grid=(1, 2, 4) if depth == 50 else (1, 1))
    randomize_norms(src)
    weights = {"backbone." + to_detectron2(k, stem): v.numpy() for k, v in src.state_dict().items()}
    weights["fc1000.weight"] = torch.zeros(3).numpy()  # an ImageNet classifier key, to be skipped
    if stem == "deeplab":  # the DeepLab stem keys as the official checkpoint spells them
        assert {k for k in weights if k.startswith("backbone.stem.")} == {
            f"backbone.stem.conv{i}.{p}" for i in (1, 2, 3)
            for p in ("weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")
        }
    path = tmp_path / "R-test.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "test"}))
    dst = ResNet(depth=depth, stem=stem, width=8, res5_multi_grid=(1, 2, 4) if depth == 50 else (1, 1))
    load_detectron2_resnet(dst, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(src.eval()(x)["res5"], dst.eval()(x)["res5"])


def test_detectron2_pickle_errors_name_the_keys(tmp_path):
    src = ResNet(depth=18, stem="basic", width=8)
    weights = {to_detectron2(k, "basic"): v.numpy() for k, v in src.state_dict().items()}
    weights["res2.0.conv9.weight"] = weights.pop("res3.0.conv1.weight")
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(weights))  # also the bare-dict variant of the format
    with pytest.raises(ValueError, match=r"bad\.pkl.*res2\.0\.conv9\.weight.*layer2\.0\.conv1\.weight"):
        load_detectron2_resnet(ResNet(depth=18, stem="basic", width=8), str(path))


def test_deeplab_multigrid_and_strides():
    net = ResNet(depth=101, stem="deeplab", width=8, res5_multi_grid=(1, 2, 4)).eval()
    assert [b.conv2.dilation[0] for b in net.layer4] == [1, 2, 4]
    assert (net.stem.conv1.stride, net.stem.conv3.out_channels) == ((2, 2), 16)
    assert net.layer1[0].conv1.in_channels == 16  # res2 reads the stem's 2w channels
    out = net(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}
    assert net.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    dilated = ResNet(depth=50, width=8, res5_dilation=2, res5_multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in dilated.layer4] == [2, 4, 8]
    assert dilated.out_strides["res5"] == 16
    assert dilated(torch.randn(1, 3, 64, 64))["res5"].shape[-2:] == (4, 4)


def test_stride_in_1x1():
    net = ResNet(depth=50, width=8, stride_in_1x1=True)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    net = ResNet(depth=50, width=8, stride_in_1x1=False)
    assert net.layer2[0].conv1.stride == (1, 1) and net.layer2[0].conv2.stride == (2, 2)


def test_freeze_at():
    net = ResNet(depth=18, stem="deeplab", width=8, norm="bn", freeze_at=2)
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "layer1"} and trainable == {"layer2", "layer3", "layer4"}


def test_frozen_bn_equals_batchnorm_in_eval():
    bn = torch.nn.BatchNorm2d(5).eval()
    randomize_norms(bn)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 5, 3, 4)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)


def test_build_backbone_toy_and_bad_depth(tmp_path):
    cfg = get_preset("toy").model.backbone
    net = build_backbone(cfg)
    assert net.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert isinstance(net.bn1, torch.nn.GroupNorm)  # the toy net trains from scratch, batch-independent
    cfg.depth = 42
    with pytest.raises(ValueError, match="depth"):
        build_backbone(cfg)


def test_build_backbone_loads_torchvision_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    cfg = get_preset("toy").model.backbone
    cfg.width, cfg.weights, cfg.norm = 64, str(path), "frozen_bn"
    net = build_backbone(cfg)
    assert torch.equal(net.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert isinstance(net.bn1, FrozenBatchNorm2d)
