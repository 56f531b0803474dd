"""Config: presets build, overrides are type-checked, unknown keys are rejected, round trip."""

import dataclasses

import pytest

from freeseg import config as C
from freeseg import presets as P


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = P.get_preset(name)
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_official_numbers_in_default_preset():
    cfg = P.get_preset("coco")
    # official COCO R101c config (coco-stuff-164k-156/mask2former_R101c_alltask_bs32_60k.yaml and its bases)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult) == (1.5e-4, 1.5e-4, 0.1)
    assert (cfg.loss.no_object_weight, cfg.loss.focal_weight, cfg.loss.dice_weight) == (0.1, 20.0, 5.0)
    assert cfg.model.decoder.num_queries == 100 and cfg.model.backbone.stem == "deeplab"
    prompt = P.get_preset("coco_prompt").train
    assert (prompt.optimizer, prompt.lr, prompt.weight_decay, prompt.warmup_iters) == ("sgd", 0.02, 0.001, 100)


def test_overrides_are_typed():
    cfg = P.get_preset("toy")
    C.apply_overrides(cfg, [
        "model.decoder.num_queries=50", "train.lr=1e-4", "train.amp=false",
        "model.backbone.res5_multi_grid=1,2,4", "data.dataset=coco",
    ])
    assert cfg.model.decoder.num_queries == 50 and isinstance(cfg.model.decoder.num_queries, int)
    assert cfg.train.lr == 1e-4 and cfg.train.amp is False
    assert cfg.model.backbone.res5_multi_grid == (1, 2, 4)
    assert cfg.data.dataset == "coco"


@pytest.mark.parametrize("bad, error, words", [
    ("model.decoder.num_querys=5", KeyError, "num_querys"),
    ("modle.decoder.num_queries=5", KeyError, "modle"),
    ("model.decoder=5", KeyError, "section"),
    ("model.decoder.num_queries=five", ValueError, "model.decoder.num_queries"),
    ("train.amp=maybe", ValueError, "train.amp"),
    ("train.lr", ValueError, "key=value"),
])
def test_bad_overrides_raise_clear_errors(bad, error, words):
    cfg = P.get_preset("toy")
    before = dataclasses.asdict(cfg)
    with pytest.raises(error, match=words):
        C.apply_overrides(cfg, [bad])
    assert dataclasses.asdict(cfg) == before


def test_unknown_preset():
    with pytest.raises(KeyError, match="known presets"):
        P.get_preset("cityscapes")
