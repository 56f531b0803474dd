"""Official FreeSeg checkpoint converter: the official layout fills our full-size model exactly.

The official key list (tests/data/official_freeseg_r101c_keys.tsv, 1,167 entries with shapes) is
the ground truth. Fast tests work on names and shapes (meta tensors: no memory, no init cost);
the slow test writes a random checkpoint in that exact layout (about 0.9 GB float32), converts
it with the command-line tool, loads the result through evaluate.py's `load_model` (strict), and
compares values, the prompt text features and CLIP image features with OpenAI's reference code.
"""

import importlib
import pathlib
import pickle

import numpy as np
import pytest
import torch

from freeseg.clip import CLIP, CLIP_MEAN, CLIP_STD, default_tokenizer
from freeseg.presets import get_preset
from freeseg.modeling.checkpoint_official import (SKIPPED, convert_official_checkpoint, convert_official_state_dict,
                                                  main, official_model_config, official_to_ours,
                                                  parse_official_config, read_official_checkpoint)
from freeseg.modeling.freeseg import build_freeseg

ROOT = pathlib.Path(__file__).resolve().parent
CANDIDATES = [ROOT / "data" / "official_freeseg_r101c_keys.tsv",
              ROOT.parent.parent / "shared" / "data" / "official_freeseg_r101c_keys.tsv"]
TSV = next((p for p in CANDIDATES if p.exists()), None)
needs_tsv = pytest.mark.skipif(TSV is None,
                               reason="official_freeseg_r101c_keys.tsv not found (tests/data or ../shared/data)")
# ViT-B/16 as OpenAI's CLIP(...) takes it: the CLIP inside the official COCO model.
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def official_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        name, shape, _dtype = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def official_constants() -> dict[str, torch.Tensor]:
    """The buffers whose values the official code fixes (MaskFormerClipAdapter, SetCriterion)."""
    return {"clip_adapter.pixel_mean": torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0,
            "clip_adapter.pixel_std": torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0,
            "criterion.empty_weight": torch.cat([torch.ones(156), torch.tensor([0.1])])}


def meta_official() -> dict[str, torch.Tensor]:
    """Every official key with its shape, on the meta device, except the three small constants."""
    state = {k: torch.empty(shape, device="meta") for k, shape in official_keys().items()}
    return state | official_constants()


@needs_tsv
def test_converted_keys_fill_our_full_model():
    official = meta_official()
    assert len(official) == 1167
    converted, report = convert_official_checkpoint(official)
    with torch.device("meta"):  # our full-size model, built independently of the converter
        model = build_freeseg(get_preset("coco"), CLIP(**VIT_B16), default_tokenizer())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in converted.items()}
    assert mine == ours  # same names, same shapes: nothing missing, nothing extra
    # Every official key used exactly once: 1,164 renamed (injective) + 3 skipped = 1,167.
    assert len(mine) == len(ours) == 1164
    assert sorted(report["skipped"]) == sorted(SKIPPED) and len(SKIPPED) == 3
    assert report["official_keys"] == 1167 and report["converted_keys"] == 1164
    assert report["train_classes"] == 156 and report["no_object_weight"] == pytest.approx(0.1)
    assert report["not_float32_in_source"] == [] and report["prompt_buffers_match_clip"] is None
    per_part = {}
    for k in mine:
        per_part[k.split(".")[0]] = per_part.get(k.split(".")[0], 0) + 1
    assert per_part == {"backbone": 530, "pixel_decoder": 117, "decoder": 195, "interaction": 13,
                        "clip_model": 302, "prompt_learner": 6, "non_object_embedding": 1}


@needs_tsv
def test_model_size_read_from_the_checkpoint_and_its_config():
    cfg = official_model_config(meta_official())
    coco = get_preset("coco")
    assert cfg.model == coco.model  # the full-size official checkpoint is the coco preset's model
    assert cfg.inference.protocol == "official" and coco.inference.protocol == "mask2former"
    assert (cfg.inference.clip_weight_seen, cfg.inference.clip_weight_unseen) == (0.2, 0.8)
    # What shapes cannot tell comes from the official config: with 4 decoder heads the pixel
    # decoder has 4 heads too, and its 8 x 3 x 4 attention weights then mean 8 points per level.
    yaml = "MODEL:\n  MASK_FORMER:\n    NHEADS: 4\n  SEM_SEG_HEAD:\n    NUM_HEADS: 2\n"
    cfg = official_model_config(meta_official(), yaml)
    assert (cfg.model.decoder.num_heads, cfg.model.pixel_decoder.num_heads, cfg.model.pixel_decoder.num_points,
            cfg.model.interaction.num_heads) == (4, 4, 8, 2)
    fewer = {k: v for k, v in meta_official().items() if not k.startswith("backbone.res4.22.")}
    with pytest.raises(ValueError, match=r"blocks per stage \(3, 4, 22, 3\)"):
        official_model_config(fewer)


def test_parse_official_config():
    text = """\
MODEL:
  CLIP_ADAPTER:
    CLIP_ENSEMBLE_WEIGHT: 0.7
    PROMPT_SHAPE: (16, 0)
  MASK_FORMER:
    NHEADS: 8
    PRE_NORM: false
    TEST:
      OVERLAP_THRESHOLD: 0.5
  PIXEL_MEAN:
  - 123.675
  - 116.28
  RPN:
    BBOX_REG_WEIGHTS: &id001
    - 1.0
  ROI_HEADS:
    WEIGHTS: *id001
  WEIGHTS: ''
  RESNETS:
    RES5_MULTI_GRID: [1, 2, 4]
    NORM: FrozenBN
INPUT:
  MIN_SIZE_TEST: 640
"""
    values = parse_official_config(text)
    assert values["MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT"] == 0.7
    assert values["MODEL.CLIP_ADAPTER.PROMPT_SHAPE"] == [16, 0]
    assert values["MODEL.MASK_FORMER.NHEADS"] == 8 and values["MODEL.MASK_FORMER.PRE_NORM"] is False
    assert values["MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD"] == 0.5
    assert values["MODEL.PIXEL_MEAN"] == [123.675, 116.28]
    assert values["MODEL.RPN.BBOX_REG_WEIGHTS"] == [1.0] and values["MODEL.ROI_HEADS.WEIGHTS"] is None
    assert values["MODEL.WEIGHTS"] == "" and values["MODEL.RESNETS.RES5_MULTI_GRID"] == [1, 2, 4]
    assert values["MODEL.RESNETS.NORM"] == "FrozenBN" and values["INPUT.MIN_SIZE_TEST"] == 640


def test_rename_examples():
    assert official_to_ours("backbone.stem.conv2.norm.running_var") == "backbone.stem.bn2.running_var"
    assert official_to_ours("backbone.res5.2.shortcut.norm.bias") == "backbone.layer4.2.downsample.1.bias"
    assert official_to_ours("backbone.res2.0.shortcut.weight") == "backbone.layer1.0.downsample.0.weight"
    assert official_to_ours("backbone.res4.22.conv3.weight") == "backbone.layer3.22.conv3.weight"
    assert (official_to_ours("sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.value_proj.bias")
            == "pixel_decoder.transformer.layers.5.self_attn.value_proj.bias")
    assert official_to_ours("sem_seg_head.pixel_decoder.adapter_1.norm.weight") == "pixel_decoder.adapter_1.1.weight"
    assert official_to_ours("sem_seg_head.predictor.query_feat.weight") == "decoder.query_feat.weight"
    assert official_to_ours("sem_seg_head.interaction.attn.q_proj.weight") == "interaction.attn.q_proj.weight"
    assert official_to_ours("clip_adapter.clip_model.logit_scale") == "clip_model.logit_scale"
    assert (official_to_ours("clip_adapter.clip_model.visual.transformer.resblocks.11.ln_2.bias")
            == "clip_model.visual.transformer.resblocks.11.ln_2.bias")
    assert official_to_ours("clip_adapter.prompt_learner.pad_signal") == "prompt_learner.pad_signal"
    assert official_to_ours("clip_adapter.non_object_embedding") == "non_object_embedding"
    for name in SKIPPED:
        assert official_to_ours(name) is None


@needs_tsv
def test_bad_checkpoints_name_the_keys():
    with pytest.raises(ValueError, match=r"1 keys have no rule .*\['clip_adapter.text_feature_buffer'\]"):
        convert_official_checkpoint(meta_official() | {"clip_adapter.text_feature_buffer": torch.zeros(1)})
    # An official suffix prompt (a config with PROMPT_SHAPE (16, 4)) has no place in our learner.
    with pytest.raises(ValueError, match=r"unexpected \['clip_adapter.prompt_learner.suffix_prompt -> prompt_lear"):
        convert_official_checkpoint(meta_official() | {"clip_adapter.prompt_learner.suffix_prompt": torch.zeros(4, 5)})
    without = meta_official()
    del without["sem_seg_head.interaction.gamma"]
    with pytest.raises(ValueError, match=r"missing \['interaction.gamma'\]"):
        convert_official_checkpoint(without)
    with pytest.raises(ValueError, match=r"non_object_embedding: \(1, 256\) vs ours \(1, 512\)"):
        convert_official_checkpoint(meta_official() | {"clip_adapter.non_object_embedding": torch.zeros(1, 256)})
    # Another normalisation (here detectron2's ImageNet mean) cannot be represented: refuse.
    imagenet = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    with pytest.raises(ValueError, match="clip_adapter.pixel_mean"):
        convert_official_checkpoint(meta_official() | {"clip_adapter.pixel_mean": imagenet})


def test_reads_pickled_numpy_and_torch_files(tmp_path):
    arrays = {"clip_adapter.non_object_embedding": np.arange(4, dtype=np.float16).reshape(1, 4),
              "clip_adapter.prompt_learner.task_prompt": np.ones((2, 4), dtype=np.float32)}
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone"}, f)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in arrays.items()}, "iteration": 9}, tmp_path / "m.pth")
    for name in ("m.pkl", "m.pth"):
        converted, unmapped = convert_official_state_dict(read_official_checkpoint(tmp_path / name))
        assert unmapped == []
        assert converted["non_object_embedding"].dtype == torch.float32  # fp16 is widened
        assert converted["non_object_embedding"].tolist() == [[0.0, 1.0, 2.0, 3.0]]
        assert torch.equal(converted["prompt_learner.task_prompt"], torch.ones(2, 4))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        read_official_checkpoint(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_official_checkpoint(tmp_path / "nothing.pth")


def reference_prompt_features(official: dict, names: list[str],
                              task_sentence: str) -> tuple[torch.Tensor, torch.nn.Module]:
    """Text features of the official prompt sequences (text_prompt.py `LearnablePromptExtractor`:
    [task tokens][task_prompt][start][prefix_prompt][name tokens][dot][end][pad to 77]), through
    OpenAI's reference CLIP built from the official checkpoint's CLIP tensors -> ((K, E), that CLIP)."""
    import clip as openai_clip
    from clip import model as reference

    ref = reference.CLIP(*VIT_B16.values()).eval()
    ref.load_state_dict({k[len("clip_adapter.clip_model."):]: v for k, v in official.items()
                         if k.startswith("clip_adapter.clip_model.")})
    p = {k.split(".")[-1]: v for k, v in official.items() if k.startswith("clip_adapter.prompt_learner.")}

    def words(text):  # token embeddings without SOS/EOT, as the official code cuts them
        tokens = openai_clip.tokenize([text])[0]
        return ref.token_embedding(tokens[1:int(tokens.argmax())])

    head = torch.cat([words(task_sentence), p["task_prompt"], p["start_signal"], p["prefix_prompt"]])
    rows, eot = [], []
    for name in names:
        seq = torch.cat([head, words(name), p["dot_signal"], p["end_signal"]])
        eot.append(len(seq) - 1)
        rows.append(torch.cat([seq, p["pad_signal"].expand(77 - len(seq), -1)]))
    x = torch.stack(rows) + ref.positional_embedding  # (K, 77, C)
    x = ref.ln_final(ref.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
    x = x[torch.arange(len(names)), eot] @ ref.text_projection  # (K, E)
    return x / x.norm(dim=-1, keepdim=True), ref


@needs_tsv
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")
def test_random_official_checkpoint_end_to_end(tmp_path):
    importlib.import_module("clip.model")  # the reference CLIP (clip-anytorch, a test dependency)
    from freeseg.evaluation.runner import load_model

    gen = torch.Generator().manual_seed(0)
    official = {k: 0.02 * torch.randn(shape, generator=gen) for k, shape in official_keys().items()}
    official |= official_constants()
    source, out = tmp_path / "model_final.pth", tmp_path / "freeseg_coco.pt"
    torch.save({"model": official, "iteration": 59999}, source)
    del official
    report = main([str(source), str(out)])
    assert report["converted_keys"] == 1164 and sorted(report["skipped"]) == sorted(SKIPPED)
    assert report["prompt_buffers_match_clip"] is False  # random buffers, not CLIP's token embeddings

    model, cfg, _ = load_model(out)  # what evaluate.py --checkpoint does: strict load_state_dict
    assert cfg.train.stage == "alltask"
    official = torch.load(source, mmap=True, weights_only=True)["model"]
    ours = model.state_dict()
    filled = {official_to_ours(k) for k in official if k not in SKIPPED}
    assert filled == set(ours)  # every key of our model filled, each from its own official key
    for k, v in official.items():
        if k not in SKIPPED:
            assert torch.equal(ours[official_to_ours(k)], v), k
    # Spot checks by value, with the names spelled out.
    spots = {"clip_adapter.prompt_learner.prefix_prompt": model.prompt_learner.prefix_prompt,
             "sem_seg_head.interaction.gamma": model.interaction.gamma,
             "backbone.stem.conv1.weight": model.backbone.stem.conv1.weight,
             "backbone.res4.22.conv3.norm.running_var": model.backbone.layer3[22].bn3.running_var,
             "sem_seg_head.predictor.query_feat.weight": model.decoder.query_feat.weight,
             "clip_adapter.non_object_embedding": model.non_object_embedding,
             "clip_adapter.clip_model.visual.conv1.weight": model.clip_model.visual.conv1.weight}
    for k, v in spots.items():
        assert torch.equal(v, official[k]), k

    # The converted model gives the official outputs of its text and image towers.
    names = ["cow", "playingfield", "wall-concrete"]
    with torch.no_grad():
        expected, ref = reference_prompt_features(official, names, "semantic segmentation.")
        got = model.text_features(names, "semantic")
        assert (got - expected).abs().max().item() < 1e-5
        images = torch.randn(2, 3, 224, 224, generator=gen)
        a, b = model.clip_model.encode_image(images), ref.encode_image(images)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@needs_tsv
@pytest.mark.slow
def test_full_size_official_checkpoint_runs_all_three_tasks(tmp_path):
    """A random checkpoint in the full official layout (R101c, ViT-B/16), converted by the CLI,
    runs the three tasks under the official protocol, as a converted checkpoint asks."""
    from freeseg.data.categories import ensemble_unseen, get_categories
    from freeseg.evaluation.runner import load_model
    from freeseg.modeling.inference import predict

    gen = torch.Generator().manual_seed(1)
    official = {}
    for k, shape in official_keys().items():
        value = 0.02 * torch.randn(shape, generator=gen)
        if k.endswith(("norm.weight", "running_var")):  # frozen BN: positive variances, unit scales
            value = 1 + value.abs()
        official[k] = value
    source, out = tmp_path / "model_final.pth", tmp_path / "freeseg_coco.pt"
    torch.save({"model": official | official_constants()}, source)
    del official
    main([str(source), str(out)])
    model, cfg, _ = load_model(out)
    assert cfg.inference.protocol == "official" and len(model.decoder.query_feat.weight) == 100
    cats = [c for c in get_categories("coco_panoptic") if c["name"] in ("person", "cow", "road", "sky-other-merged")]
    names = [c["name"] for c in cats]
    unseen = torch.from_numpy(ensemble_unseen("coco_panoptic", cats, "official"))
    is_thing = torch.tensor([c["isthing"] for c in cats])
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=gen)
    result = predict(model, image, names, unseen, is_thing, cfg=cfg.inference, out_size=(40, 50))
    assert result["semantic"].shape == (4, 40, 50) and result["semantic"].isfinite().all()
    assert result["instance"]["masks"].shape[1:] == (40, 50)
    assert result["panoptic"][0].shape == (40, 50)
