"""Official FreeSeg checkpoint -> our FreeSeg model, through one visible rename table.

The official model (bytedance/FreeSeg, `OpenVocabulary` meta-architecture) nests its parts as
`backbone.*` (detectron2 ResNet names), `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`, `sem_seg_head.interaction.*`, `clip_adapter.*` and `criterion.*`
(all 1,167 keys: tests/data/official_freeseg_r101c_keys.tsv, every one float32: the official
`build_clip_model` loads CLIP with `clip.load(..., device="cpu")`, which casts it to float32,
and the checkpoint holds the ViT-B/16 towers only, no TorchScript extras, no attnpool).
Ours uses torchvision names in the backbone and Mask2Former's everywhere else, so most keys only
change their prefix; CLIP keeps OpenAI's names under `clip_model.`, which is where
`freeseg.evaluation.runner.load_model` finds it to rebuild CLIP with `freeseg.clip.build_model`.

`OFFICIAL_RENAMES` is the table: (official prefix, our prefix), first match wins, so longer,
more specific prefixes come first. Backbone keys additionally go through the detectron2 ->
torchvision table of `backbone.py` (`DETECTRON2_RESNET_RENAMES`). `SKIPPED` lists the three
official tensors with no counterpart, and why; the two CLIP normalisation constants among them
are checked, not copied.

The model's size comes from the checkpoint itself (`official_model_config`): every width, depth
and count from the tensor shapes, as CLIP's `build_model` does; what shapes cannot tell (numbers
of attention heads, ResNet dilations, inference thresholds) from the official config
(`--official-config`, detectron2's `config.yaml` of the run, i.e. `cfg.dump()`), else the
official full-size values (`OFFICIAL_CONFIG_KEYS`). The converted checkpoint's config says
`inference.protocol = "official"`: evaluate.py then runs the official inference rules
(docs/differences.md).

Usage:
    python -m freeseg.modeling.checkpoint_official model_final.pth freeseg_coco.pt [--official-config config.yaml]
    python evaluate.py --checkpoint freeseg_coco.pt
"""

import argparse
import copy
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freeseg.clip import CLIP_MEAN, CLIP_STD
from freeseg.config import Config, apply_overrides, to_dict
from freeseg.errors import CheckpointError, ConfigError, run_cli
from freeseg.presets import get_preset
from freeseg.modeling.backbone import detectron2_to_torchvision_name
from freeseg.serialization import load_torch_file, read_numpy_pickle, trust_files

OFFICIAL_RENAMES: list[tuple[str, str]] = [
    # ---- backbone: prefix only here; detectron2 -> torchvision names in backbone.py (DeepLab stem).
    ("backbone.", "backbone."),
    # ---- pixel decoder (Mask2Former `MSDeformAttnPixelDecoder`)
    # The encoder layers sit one module shallower here (no `encoder` wrapper around `layers`).
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.", "pixel_decoder.transformer.layers."),
    # detectron2's Conv2d carries its norm as `.norm`; ours are nn.Sequential(conv, norm[, relu]).
    ("sem_seg_head.pixel_decoder.adapter_1.norm.", "pixel_decoder.adapter_1.1."),
    ("sem_seg_head.pixel_decoder.adapter_1.weight", "pixel_decoder.adapter_1.0.weight"),
    ("sem_seg_head.pixel_decoder.layer_1.norm.", "pixel_decoder.layer_1.1."),
    ("sem_seg_head.pixel_decoder.layer_1.weight", "pixel_decoder.layer_1.0.weight"),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    # ---- transformer decoder (FreeSeg `OpenTransformerPredictor`): identical names below the prefix.
    ("sem_seg_head.predictor.", "decoder."),
    # ---- semantic context interaction (heads/module.py `ContextInteraction`): identical names.
    ("sem_seg_head.interaction.", "interaction."),
    # ---- CLIP (OpenAI names), prompt learner (official buffer names), no-object embedding.
    ("clip_adapter.clip_model.", "clip_model."),
    ("clip_adapter.prompt_learner.", "prompt_learner."),
    ("clip_adapter.non_object_embedding", "non_object_embedding"),
]

SKIPPED: dict[str, str] = {
    "criterion.empty_weight": "cross-entropy class weights (one per training class, no-object weight last); "
                              "SetCriterion rebuilds them from loss.no_object_weight for each batch's classes",
    "clip_adapter.pixel_mean": "CLIP's mean colour x 255, a constant; region_classifier.py derives it from "
                               "freeseg.clip.CLIP_MEAN (checked here, not copied)",
    "clip_adapter.pixel_std": "CLIP's colour std x 255, a constant; region_classifier.py derives it from "
                              "freeseg.clip.CLIP_STD (checked here, not copied)",
}
# The constants above as the official `MaskFormerClipAdapter` registers them: (1, 3, 1, 1), 0-255 scale.
CONSTANTS: dict[str, tuple[float, ...]] = {
    "clip_adapter.pixel_mean": tuple(255.0 * c for c in CLIP_MEAN),
    "clip_adapter.pixel_std": tuple(255.0 * c for c in CLIP_STD),
}


# What the tensor shapes cannot tell, read from the official config: (official key, our field,
# official full-size value, used when the key is absent). Sources: mask2former/config.py and
# configs/coco-stuff-164k-156/mask2former_R101c_alltask_bs32_60k.yaml with its bases.
OFFICIAL_CONFIG_KEYS: list[tuple[str, str, object]] = [
    # The decoder's heads; the official pixel decoder takes its heads from the same key
    # (heads/msdeformattn.py, `MSDeformAttnPixelDecoder.from_config`).
    ("MODEL.MASK_FORMER.NHEADS", "model.decoder.num_heads", 8),
    ("MODEL.MASK_FORMER.NHEADS", "model.pixel_decoder.num_heads", 8),
    ("MODEL.MASK_FORMER.PRE_NORM", "model.decoder.pre_norm", False),
    ("MODEL.SEM_SEG_HEAD.NUM_HEADS", "model.interaction.num_heads", 8),
    ("MODEL.RESNETS.STRIDE_IN_1X1", "model.backbone.stride_in_1x1", False),
    ("MODEL.RESNETS.RES5_DILATION", "model.backbone.res5_dilation", 1),
    ("MODEL.RESNETS.RES5_MULTI_GRID", "model.backbone.res5_multi_grid", (1, 2, 4)),
    ("MODEL.PIXEL_MEAN", "model.pixel_mean", (123.675, 116.28, 103.53)),
    ("MODEL.PIXEL_STD", "model.pixel_std", (58.395, 57.12, 57.375)),
    ("MODEL.MASK_FORMER.SIZE_DIVISIBILITY", "model.size_divisibility", 32),
    ("MODEL.CLIP_ADAPTER.MASK_THR", "inference.mask_threshold", 0.5),
    ("MODEL.CLIP_ADAPTER.MASK_EXPAND_RATIO", "inference.mask_expand_ratio", 1.0),
    ("MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE", "inference.use_clip", True),
    ("MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "inference.overlap_threshold", 0.5),
    ("INPUT.MIN_SIZE_TEST", "data.test_short_side", 640),
]
# CLIP_ENSEMBLE_WEIGHT w is CLIP's exponent for unseen classes and the mask classifier's for
# seen ones (open_vocabulary_model.py), so CLIP's seen exponent is 1 - w.
ENSEMBLE_WEIGHT_KEY, ENSEMBLE_WEIGHT_DEFAULT = "MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT", 0.8
# ResNet blocks per stage -> depth (bottleneck blocks, as every official FreeSeg backbone).
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}


def _yaml_scalar(text: str):
    """One YAML scalar or flow list of cfg.dump() -> bool, None, int, float, str or list.
    Aliases (*id001) and tags (!!python/...) read as None: no key the converter needs has them."""
    text = text.strip()
    if text.startswith(("*", "!!")):
        return None
    if text[:1] in ("[", "(") and text[-1:] in ("]", ")"):
        return [_yaml_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    if len(text) >= 2 and text[0] in ("'", '"') and text[-1] == text[0]:
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_official_config(text: str) -> dict[str, object]:
    """detectron2's YAML config (`cfg.dump()`, or one config file without its `_BASE_`) ->
    {dotted key: value}, e.g. {"MODEL.MASK_FORMER.NHEADS": 8}. Reads nested mappings whose
    leaves are scalars or lists of scalars (block `- x` items or flow `[x, y]`), which is all the
    converter needs; not a general YAML reader (no PyYAML at run time)."""
    values: dict[str, object] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    open_key = None  # a "KEY:" with nothing after it: a mapping or a block list follows
    for line in text.splitlines():
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if body.startswith("- "):  # yaml.dump writes list items at the indent of their key
            if open_key is not None:
                values.setdefault(open_key, []).append(_yaml_scalar(body[2:]))
            continue
        key, colon, rest = body.partition(":")
        if not colon:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key.strip()])
        rest = re.sub(r"^&\w+\s*", "", rest.strip())  # an anchor names the value; keep the value
        if rest:
            values[dotted], open_key = _yaml_scalar(rest), None
        else:
            stack.append((indent, key.strip()))
            open_key = dotted
    return values


def _count(state: dict, prefix: str) -> int:
    """Number of numbered sub-modules `prefix{i}.` in a state dict (layers, blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def official_model_config(state: dict, official_config: str | None = None, base: Config | None = None) -> Config:
    """Our config for the model an official FreeSeg state dict holds (official key names).

    Sizes come from the tensor shapes; heads, dilations, normalisation and inference settings
    from `official_config` (YAML text, see `parse_official_config`), a missing key taking the
    official full-size value (OFFICIAL_CONFIG_KEYS). Everything else is `base`'s (default the
    "coco" preset: dataset, training). `inference.protocol` is "official".
    """
    cfg = copy.deepcopy(base) if base is not None else get_preset("coco")
    official = parse_official_config(official_config) if official_config else {}

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"official checkpoint: no {key}, so the model's size cannot be read from it")
        return tuple(state[key].shape)

    m = cfg.model
    if not any(k.startswith("backbone.res2.") for k in state):
        raise CheckpointError("official checkpoint: no backbone.res2.* weights, so not an official FreeSeg model "
                              "(a checkpoint of ours needs no conversion)")
    blocks = tuple(_count(state, f"backbone.res{i}.") for i in range(2, 6))
    if blocks not in RESNET_DEPTHS:
        raise CheckpointError(f"official checkpoint: ResNet blocks per stage {blocks} are not one of "
                         f"{sorted(RESNET_DEPTHS)} (ResNet-50/101 with bottleneck blocks)")
    m.backbone.depth = RESNET_DEPTHS[blocks]
    m.backbone.stem = "deeplab" if "backbone.stem.conv2.weight" in state else "basic"
    m.backbone.width = shape("backbone.res2.0.conv1.weight")[0]  # res2's bottleneck width
    pd = "sem_seg_head.pixel_decoder."
    m.pixel_decoder.mask_dim, m.pixel_decoder.conv_dim = shape(pd + "mask_features.weight")[:2]
    m.pixel_decoder.num_encoder_layers = _count(state, pd + "transformer.encoder.layers.")
    m.pixel_decoder.ffn_dim = shape(pd + "transformer.encoder.layers.0.linear1.weight")[0]
    dec = "sem_seg_head.predictor."
    m.decoder.num_queries, m.decoder.hidden_dim = shape(dec + "query_feat.weight")
    m.decoder.num_layers = _count(state, dec + "transformer_self_attention_layers.")
    m.decoder.ffn_dim = shape(dec + "transformer_ffn_layers.0.linear1.weight")[0]
    m.decoder.mask_mlp_layers = _count(state, dec + "mask_embed.layers.")
    m.decoder.class_mlp_hidden = shape(dec + "class_embed.layers.0.weight")[0]
    m.interaction.enabled = "sem_seg_head.interaction.attn.q_proj.weight" in state
    if m.interaction.enabled:
        m.interaction.attn_dim = shape("sem_seg_head.interaction.attn.q_proj.weight")[0]
    m.prompt.class_ctx = shape("clip_adapter.prompt_learner.prefix_prompt")[0]
    m.prompt.task_ctx = shape("clip_adapter.prompt_learner.task_prompt")[0]

    overrides = ["inference.protocol=official"]
    for key, field, default in OFFICIAL_CONFIG_KEYS:
        value = official.get(key)
        value = default if value is None else value
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        overrides.append(f"{field}={text}")
    weight = official.get(ENSEMBLE_WEIGHT_KEY)
    weight = ENSEMBLE_WEIGHT_DEFAULT if weight is None else float(weight)
    # 1 - 0.8 is 0.19999999999999996 in float64, the same float32 exponent as 0.2.
    overrides += [f"inference.clip_weight_unseen={weight}", f"inference.clip_weight_seen={round(1 - weight, 12)}"]
    apply_overrides(cfg, overrides)
    # The deformable attention's points per head and level are not a config key: the official
    # encoder layer hard-codes 4. Its attention-weight projection has heads x levels x points rows.
    rows = shape(pd + "transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    levels = shape(pd + "transformer.level_embed")[0]
    if rows % (m.pixel_decoder.num_heads * levels):
        raise CheckpointError(f"official checkpoint: {rows} deformable attention weights do not split into "
                         f"{m.pixel_decoder.num_heads} heads (MODEL.MASK_FORMER.NHEADS) x {levels} levels")
    m.pixel_decoder.num_points = rows // (m.pixel_decoder.num_heads * levels)
    return cfg


def _tensor(value) -> Tensor:
    """A tensor from a tensor or a numpy array (copied: pickled arrays may be read-only)."""
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value


def official_to_ours(name: str) -> str | None:
    """One official key -> our key, or None when no rule covers it."""
    for old, new in OFFICIAL_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
            if new == "backbone.":
                name = new + detectron2_to_torchvision_name(name[len(new):], stem="deeplab")
            return name
    return None


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an official FreeSeg state dict; numpy arrays become tensors, floats become float32.

    Returns (converted state dict, official keys that no rule covers, skipped ones included).
    """
    converted, unmapped = {}, []
    for name, value in state_dict.items():
        new = official_to_ours(name)
        if new is None:
            unmapped.append(name)
            continue
        if new in converted:
            raise CheckpointError(f"official checkpoint: two keys map to {new!r} (check OFFICIAL_RENAMES)")
        value = _tensor(value)
        converted[new] = value.float() if value.is_floating_point() else value
    return converted, unmapped


def read_official_checkpoint(path: str | Path) -> dict:
    """The model state dict of a detectron2-style checkpoint: a torch file (.pth) or a pickle
    (.pkl, numpy arrays) holding {"model": state_dict, ...} or the bare state dict.

    Both formats are pickles, which can run code while they are read; they are read without
    it: tensors, NumPy arrays and plain containers only (freeseg/serialization.py). A file that
    holds anything else is refused, naming it, unless files are trusted (--trust-checkpoint).
    """
    path = Path(path)
    if path.suffix == ".pkl":
        data = read_numpy_pickle(path, "official checkpoint")
    else:
        data = load_torch_file(path, "official checkpoint")
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"official checkpoint {path}: expected {{'model': state_dict}} or a state dict")
    return state


def check_constants(state_dict: dict) -> None:
    """The official CLIP normalisation buffers must be CLIP's constants: ours are fixed to them."""
    for name, expected in CONSTANTS.items():
        if name not in state_dict:
            continue  # reported as missing by `convert_official_checkpoint`
        value = _tensor(state_dict[name]).float().flatten()
        if not torch.allclose(value, torch.tensor(expected), atol=1e-3):
            raise CheckpointError(f"official checkpoint: {name} = {value.tolist()}, expected CLIP's {list(expected)}; "
                             "a model trained with other constants cannot be represented here")


def expected_state_shapes(cfg: Config, clip_shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """Names and shapes of the state dict of `build_freeseg(cfg, CLIP of clip_shapes)`, built on
    the meta device (no memory, no initialisation; about 0.5 s)."""
    from freeseg.clip import build_model, default_tokenizer
    from freeseg.modeling.freeseg import build_freeseg

    with torch.device("meta"):
        clip_model = build_model({k: torch.empty(s) for k, s in clip_shapes.items()})
        model = build_freeseg(cfg, clip_model, default_tokenizer())
    return {k: v.shape for k, v in model.state_dict().items()}


def _prompt_buffers_match_clip(state: dict[str, Tensor]) -> bool | None:
    """Are the official prompt buffers CLIP's token embeddings of SOS, '.', EOT and padding (id 0),
    i.e. what our PromptLearner computes itself? None when the values are not at hand (meta)."""
    from freeseg.clip import default_tokenizer

    table = state["clip_model.token_embedding.weight"]  # (vocab, C)
    if table.is_meta:
        return None
    tok = default_tokenizer()
    ids = {"start_signal": tok.sot_token, "dot_signal": tok.encode(".")[0], "end_signal": tok.eot_token,
           "pad_signal": 0}
    return all(torch.equal(state[f"prompt_learner.{n}"][0], table[i]) for n, i in ids.items())


def convert_official_checkpoint(source: str | Path | dict, cfg: Config | None = None,
                                official_config: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Official checkpoint (path, {"model": ...} dict or bare state dict) -> (our state dict, report).

    Every official key is either renamed or in SKIPPED; every key of our model (built from `cfg`,
    default `official_model_config` of the checkpoint and `official_config`, the YAML text of its
    official config, or the "config" string of a `source` dict) is filled, with the right shape.
    Anything else raises a CheckpointError that lists the keys. The report is JSON-serialisable.
    """
    state = read_official_checkpoint(source) if isinstance(source, (str, Path)) else source.get("model", source)
    if cfg is None:
        embedded = source.get("config") if isinstance(source, dict) else None
        cfg = official_model_config(state, official_config or (embedded if isinstance(embedded, str) else None))
    check_constants(state)
    converted, unmapped = convert_official_state_dict(state)
    where = "official checkpoint" if isinstance(source, dict) else f"official checkpoint {source}"
    unknown = sorted(set(unmapped) - set(SKIPPED))
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} keys have no rule in OFFICIAL_RENAMES or SKIPPED: {unknown}")
    clip_shapes = {k[len("clip_model."):]: v.shape for k, v in converted.items() if k.startswith("clip_model.")}
    expected = expected_state_shapes(cfg, clip_shapes)
    missing = sorted(set(expected) - set(converted))
    surplus = set(converted) - set(expected)
    extra = sorted(f"{k} -> {official_to_ours(k)}" for k in state if official_to_ours(k) in surplus)
    wrong = sorted(f"{k}: {tuple(converted[k].shape)} vs ours {tuple(s)}"
                   for k, s in expected.items() if k in converted and converted[k].shape != s)
    if missing or extra or wrong:
        raise CheckpointError(f"{where} does not fit our FreeSeg model of this config: "
                         f"missing {missing}, unexpected {extra}, shape mismatches {wrong}")
    empty_weight = state.get("criterion.empty_weight")
    empty_weight = None if empty_weight is None else _tensor(empty_weight)
    report = {
        "official_keys": len(state),
        "converted_keys": len(converted),
        "skipped": {k: SKIPPED[k] for k in unmapped},
        "not_float32_in_source": sorted(k for k, v in state.items()
                                        if str(v.dtype).removeprefix("torch.") != "float32"),
        # criterion.empty_weight is (training classes + 1,): the training vocabulary size and the
        # no-object weight the model was trained with (official COCO: 156 classes, 0.1).
        "train_classes": None if empty_weight is None else len(empty_weight) - 1,
        "no_object_weight": None if empty_weight is None or empty_weight.is_meta else float(empty_weight[-1]),
        "prompt_buffers_match_clip": _prompt_buffers_match_clip(converted),
    }
    return converted, report


def main(argv: list[str] | None = None) -> dict:
    """CLI: convert IN (official .pth/.pkl) to OUT, a checkpoint `evaluate.py --checkpoint OUT` loads."""
    from freeseg.data.io import check_output_file, read_text_file
    from freeseg.distributed import atomic_torch_save

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="official FreeSeg checkpoint (model_final.pth or .pkl)")
    parser.add_argument("out", help="where to write our checkpoint (.pt or .pth)")
    parser.add_argument("--preset", default="coco",
                        help="config preset for what the checkpoint cannot tell: dataset, training (default: coco)")
    parser.add_argument("--official-config", default=None,
                        help="the official run's config.yaml (cfg.dump()): heads, dilations, thresholds; "
                             "default: the official full-size values")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle SOURCE fully even if it holds more than weights: only for a file you trust, "
                             "as unpickling can run code hidden in it")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    trust_files(args.trust_checkpoint)
    base = get_preset(args.preset)
    if base.train.stage != "alltask":
        raise ConfigError(f"--preset {args.preset}: an official FreeSeg model needs an all-task preset")
    check_output_file(args.out, "converted checkpoint", (".pt", ".pth"), inputs=(args.source,))
    official_config = read_text_file(args.official_config, "--official-config") if args.official_config else None
    official = read_official_checkpoint(args.source)
    cfg = official_model_config(official, official_config, base)
    state, report = convert_official_checkpoint(official, cfg)
    atomic_torch_save({"model": state, "config": to_dict(cfg), "iteration": 0,
                       "converted_from": str(args.source), "conversion": report}, args.out)
    print(f"{args.source}: {report['official_keys']} keys -> {report['converted_keys']} in {args.out}; "
          f"skipped {sorted(report['skipped'])}; training classes {report['train_classes']}, "
          f"no-object weight {report['no_object_weight']}; prompt buffers = CLIP token embeddings: "
          f"{report['prompt_buffers_match_clip']}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m freeseg.modeling.checkpoint_official"))
