"""Official FreeSeg checkpoint -> our FreeSeg model, through one visible rename table.

The official model (bytedance/FreeSeg, `OpenVocabulary` meta-architecture) nests its parts as
`backbone.*` (detectron2 ResNet names), `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`, `sem_seg_head.interaction.*`, `clip_adapter.*` and `criterion.*`
(all 1,167 keys: shared/data/official_freeseg_r101c_keys.tsv, every one float32: the official
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

Usage:
    python -m freeseg.modeling.checkpoint_official model_final.pth freeseg_coco.pt
    python evaluate.py --checkpoint freeseg_coco.pt
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freeseg.clip import CLIP_MEAN, CLIP_STD
from freeseg.config import Config, to_dict
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


def convert_official_checkpoint(source: str | Path | dict, cfg: Config | None = None) -> tuple[dict[str, Tensor], dict]:
    """Official checkpoint (path, {"model": ...} dict or bare state dict) -> (our state dict, report).

    Every official key is either renamed or in SKIPPED; every key of our model (built from `cfg`,
    default the "coco" preset) is filled, with the right shape. Anything else raises a CheckpointError
    that lists the keys. The report is JSON-serialisable.
    """
    cfg = cfg or get_preset("coco")
    state = read_official_checkpoint(source) if isinstance(source, (str, Path)) else source.get("model", source)
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
    from freeseg.data.io import check_output_file
    from freeseg.distributed import atomic_torch_save

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="official FreeSeg checkpoint (model_final.pth or .pkl)")
    parser.add_argument("out", help="where to write our checkpoint (.pt or .pth)")
    parser.add_argument("--preset", default="coco", help="config preset the model belongs to (default: coco)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle SOURCE fully even if it holds more than weights: only for a file you trust, "
                             "as unpickling can run code hidden in it")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    trust_files(args.trust_checkpoint)
    cfg = get_preset(args.preset)
    if cfg.train.stage != "alltask":
        raise ConfigError(f"--preset {args.preset}: an official FreeSeg model needs an all-task preset")
    check_output_file(args.out, "converted checkpoint", (".pt", ".pth"), inputs=(args.source,))
    state, report = convert_official_checkpoint(args.source, cfg)
    atomic_torch_save({"model": state, "config": to_dict(cfg), "iteration": 0,
                       "converted_from": str(args.source), "conversion": report}, args.out)
    print(f"{args.source}: {report['official_keys']} keys -> {report['converted_keys']} in {args.out}; "
          f"skipped {sorted(report['skipped'])}; training classes {report['train_classes']}, "
          f"no-object weight {report['no_object_weight']}; prompt buffers = CLIP token embeddings: "
          f"{report['prompt_buffers_match_clip']}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m freeseg.modeling.checkpoint_official"))
