"""ResNet backbones (He et al., CVPR 2016) returning the four residual stages res2..res5.

FreeSeg (paper section 4.1) uses Mask2Former's "R101c": ResNet-101 with the DeepLab stem (three
3x3 convs instead of one 7x7), the stride in the 3x3 conv (`stride_in_1x1=False`, "ResNet v1.5"),
DeepLab multi-grid dilations (1, 2, 4) inside res5, and frozen BatchNorm. ResNet-18/34/50 with
the torchvision stem are here too: ResNet-50 for torchvision's ImageNet weights and narrow
ResNet-18s for the toy world.

Parameter names are torchvision's (conv1/bn1/layer1..layer4, downsample.0/1), so torchvision
state dicts load with strict=True. The DeepLab stem has no torchvision counterpart; it is
`stem.conv1/bn1, stem.conv2/bn2, stem.conv3/bn3`. detectron2 checkpoints (the `R-103.pkl`
FreeSeg starts from) are renamed through `DETECTRON2_RESNET_RENAMES`, the one table below.

Outputs (axis legend: B batch, C channels, H W spatial):
    forward(x (B, 3, H, W)) -> {"res2": (B, C2, H/4, W/4), "res3": (B, C3, H/8, W/8),
                                "res4": (B, C4, H/16, W/16), "res5": (B, C5, H/32, W/32)}

Deliberate differences from the official code (detectron2 `ResNet` + `build_resnet_deeplab_backbone`):
torchvision names instead of detectron2's; a shortcut conv whenever the stride or the channel
count changes (torchvision's rule; detectron2 adds one only on a channel change, which gives the
same layers for every depth here); no deformable convs, groups or SyncBN.
"""

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeseg.config import BackboneConfig
from freeseg.errors import CheckpointError
from freeseg.serialization import load_torch_file, read_numpy_pickle

STAGES = ("res2", "res3", "res4", "res5")
# Residual blocks per stage (He et al. 2016, Table 1); 18/34 use BasicBlock, 50/101 Bottleneck.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Pre-trained backbones are fine-tuned with batches of a few images per GPU, too few for good
    batch statistics, so detectron2 (and FreeSeg) freeze them. Buffer names equal BatchNorm2d's,
    so torchvision and detectron2 checkpoints load unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps  # torchvision's and detectron2's BatchNorm eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A BatchNorm2d checkpoint also holds a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # GroupNorm does not depend on the batch, so a ResNet trained from scratch gives the
        # same result on 1 process with batch 4 as on 2 processes with batch 2 (toy world).
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"ResNet: unknown norm {kind!r}; choose 'frozen_bn', 'bn' or 'gn'")


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size (for stride 1) whatever the dilation.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). `stride_in_1x1` has no meaning here (no 1x1 conv)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, norm: str, stride_in_1x1: bool):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = _norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = _norm(norm, planes)
        self.downsample = _shortcut(cin, planes, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4) (ResNet-50/101).

    The stride sits in the 3x3 conv (torchvision, `stride_in_1x1=False`) or in the first 1x1
    conv (original MSRA / Caffe2 weights, `stride_in_1x1=True`); the weights only fit one of them.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, norm: str, stride_in_1x1: bool):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride_1x1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride_3x3, dilation)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(norm, planes * 4)
        self.downsample = _shortcut(cin, planes * 4, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))


class DeepLabStem(nn.Module):
    """Three 3x3 convs (3 -> w stride 2, w -> w, w -> 2w), each with norm + ReLU, then a
    3x3 stride-2 max-pool: stride 4 like the 7x7 stem, with a larger effective depth
    (detectron2 `DeepLabStem`, used by the "R101c" / `R-103.pkl` weights)."""

    def __init__(self, width: int, norm: str):
        super().__init__()
        self.conv1 = _conv3x3(3, width, stride=2)
        self.bn1 = _norm(norm, width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = _norm(norm, width)
        self.conv3 = _conv3x3(width, 2 * width)
        self.bn3 = _norm(norm, 2 * width)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 trunk; see the module docstring for names and outputs.

    Args:
        depth: 18, 34, 50 or 101.
        stem: "basic" (torchvision: 7x7 conv + max-pool, `conv1`/`bn1`) or "deeplab" (`stem.*`).
        width: channels of the first stage's 3x3 convs (64 = standard ResNet); stage k has
            width * 2^k, times 4 at the output of a Bottleneck.
        res5_dilation: 1 keeps res5 at stride 32; 2 replaces res5's stride by dilation (stride 16).
        res5_multi_grid: per-block dilation multipliers inside res5 (DeepLab v3 multi-grid);
            block i of res5 gets dilation res5_dilation * res5_multi_grid[i]. One entry per
            res5 block, except that all ones (no multi-grid) fits any depth.
        stride_in_1x1: where a Bottleneck puts its stride (see `Bottleneck`).
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also res2..res{k}.
        norm: "frozen_bn" (pre-trained backbones, FreeSeg's setting), "bn" or "gn" (training from scratch).
    """

    def __init__(
        self,
        depth: int = 50,
        stem: str = "basic",
        width: int = 64,
        res5_dilation: int = 1,
        res5_multi_grid: tuple[int, ...] = (1, 1, 1),
        stride_in_1x1: bool = False,
        freeze_at: int = 0,
        norm: str = "frozen_bn",
    ):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet: depth must be one of {sorted(DEPTHS)}, got {depth}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"ResNet: res5_dilation must be 1 or 2, got {res5_dilation}")
        blocks_per_stage = DEPTHS[depth]
        if set(res5_multi_grid) <= {1}:
            res5_multi_grid = (1,) * blocks_per_stage[3]  # all ones = no multi-grid, whatever the depth
        if len(res5_multi_grid) != blocks_per_stage[3]:
            raise ValueError(
                f"ResNet: res5_multi_grid needs one entry per res5 block ({blocks_per_stage[3]}), got {res5_multi_grid}"
            )
        block = BasicBlock if depth < 50 else Bottleneck
        self.stem_type = stem
        if stem == "basic":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = _norm(norm, width)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            cin = width
        elif stem == "deeplab":
            self.stem = DeepLabStem(width, norm)
            cin = 2 * width
        else:
            raise ValueError(f"ResNet: unknown stem {stem!r}; choose 'basic' or 'deeplab'")

        self.out_channels: dict[str, int] = {}
        self.out_strides: dict[str, int] = {}
        stride_so_far = 4  # after the stem
        for k, num_blocks in enumerate(blocks_per_stage):
            planes = width * 2**k
            stage_stride = 1 if k == 0 else 2
            dilations = [1] * num_blocks
            if k == 3:
                dilations = [res5_dilation * g for g in res5_multi_grid]
                if res5_dilation == 2:
                    stage_stride = 1  # dilation replaces the stride (DeepLab's output stride 16)
            layers = []
            for i in range(num_blocks):
                layers.append(block(cin, planes, stage_stride if i == 0 else 1, dilations[i], norm, stride_in_1x1))
                cin = planes * block.expansion
            self.add_module(f"layer{k + 1}", nn.Sequential(*layers))
            stride_so_far *= stage_stride
            self.out_channels[STAGES[k]] = cin
            self.out_strides[STAGES[k]] = stride_so_far

        self._init_weights()
        self._freeze(freeze_at)

    def _init_weights(self) -> None:
        # torchvision's initialisation: He-normal (fan_out) convs, unit-scale norms.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _freeze(self, freeze_at: int) -> None:
        stem = [self.stem] if self.stem_type == "deeplab" else [self.conv1, self.bn1]
        frozen = ([] if freeze_at < 1 else stem) + [getattr(self, f"layer{k}") for k in range(1, freeze_at)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.stem_type == "deeplab":
            x = self.stem(x)
        else:
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4)
        out = {}
        for k, name in enumerate(STAGES):
            x = getattr(self, f"layer{k + 1}")(x)
            out[name] = x  # (B, out_channels[name], H / out_strides[name], W / out_strides[name])
        return out


# --------------------------------------------------------------------------- weights

# detectron2 names -> ours. Applied in order with re.sub (every rule, not the first match).
# detectron2 numbers stages from the stem (res2 is the first residual stage, torchvision's
# layer1), calls a block's norm `convK.norm` (torchvision: `bnK`) and its projection `shortcut`
# (torchvision: `downsample.0` conv, `downsample.1` norm).
DETECTRON2_RESNET_RENAMES: list[tuple[str, str]] = [
    (r"^res2\.", "layer1."),
    (r"^res3\.", "layer2."),
    (r"^res4\.", "layer3."),
    (r"^res5\.", "layer4."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.weight$", ".downsample.0.weight"),
    (r"\.conv(\d)\.norm\.", r".bn\1."),  # also the DeepLab stem: stem.conv2.norm. -> stem.bn2.
]
# With the basic stem, detectron2's `stem.conv1` / `stem.conv1.norm` are torchvision's top-level
# `conv1` / `bn1` (the DeepLab stem keeps its `stem.` prefix).
DETECTRON2_BASIC_STEM_RENAMES: list[tuple[str, str]] = [(r"^stem\.", "")]


def detectron2_to_torchvision_name(name: str, stem: str) -> str:
    """One detectron2 ResNet key (without a "backbone." prefix) -> our key."""
    rules = DETECTRON2_RESNET_RENAMES + (DETECTRON2_BASIC_STEM_RENAMES if stem == "basic" else [])
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def load_detectron2_resnet(model: ResNet, path: str) -> None:
    """Load detectron2's pickled ResNet weights (e.g. `R-103.pkl`) into `model`, strictly.

    The file is a pickle of {"model": {name: numpy array}, "__author__": ...} (detectron2's
    `DetectionCheckpointer` format) or of the bare {name: array} dict. Keys may carry a
    "backbone." prefix. Classifier keys (anything outside stem.* / res*) are skipped; any other
    unknown key, missing key or shape mismatch raises a ValueError naming the keys and the file.
    """
    data = read_numpy_pickle(path, "backbone weights")  # NumPy arrays only: never runs code from the file
    weights = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict) or "blobs" in weights:
        raise CheckpointError(f"{path}: not a detectron2 checkpoint (expected a pickled dict with a 'model' dict)")
    ours = model.state_dict()
    state, unknown = {}, []
    for name, array in weights.items():
        name = name.removeprefix("backbone.")
        if not (name.startswith("stem.") or re.match(r"res[2-5]\.", name)) or name.endswith("_momentum"):
            continue  # ImageNet classifier, solver state: not part of the backbone
        new = detectron2_to_torchvision_name(name, model.stem_type)
        if new not in ours:
            unknown.append(name)
            continue
        state[new] = torch.as_tensor(array).to(ours[new].dtype)
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items() if v.shape != ours[k].shape]
    if unknown or missing or wrong:
        raise CheckpointError(
            f"{path}: does not fit ResNet(stem={model.stem_type!r}): unknown keys {unknown[:8]}, "
            f"missing keys {missing[:8]}, shape mismatches {wrong[:8]}"
        )
    model.load_state_dict(state, strict=False)  # strictness checked above (num_batches_tracked aside)


def load_torchvision_resnet(model: ResNet, state_dict: dict[str, Tensor], path: str = "state dict") -> None:
    """Load a torchvision ResNet state dict strictly, minus its ImageNet classifier (`fc.*`)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"backbone weights {path}: expected a ResNet state dict, found a {type(state_dict).__name__}")
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        from freeseg.engine import mismatch

        raise CheckpointError(f"backbone weights {path} do not fit this ResNet (model.backbone.*): "
                              f"{mismatch(err)}") from None


def build_backbone(cfg: BackboneConfig) -> ResNet:
    """The backbone of `cfg`, with its ImageNet weights when `cfg.weights` names a file."""
    model = ResNet(
        depth=cfg.depth,
        stem=cfg.stem,
        width=cfg.width,
        res5_dilation=cfg.res5_dilation,
        res5_multi_grid=tuple(cfg.res5_multi_grid),
        stride_in_1x1=cfg.stride_in_1x1,
        freeze_at=cfg.freeze_at,
        norm=cfg.norm,
    )
    if cfg.weights.endswith(".pkl"):
        load_detectron2_resnet(model, cfg.weights)
    elif cfg.weights:
        load_torchvision_resnet(model, load_torch_file(cfg.weights, "backbone weights"), cfg.weights)
    return model
