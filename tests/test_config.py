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


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_every_preset_passes_validation(name):
    C.validate(P.get_preset(name))


def test_every_rule_names_a_field():
    fields = C._flat(P.get_preset("coco"))
    assert [k for k in C.RULES if k not in fields] == []


@pytest.mark.parametrize("override, words", [
    ("train.lr=nan", "train.lr=nan: must be a finite number > 0"),
    ("train.lr=-1e-4", "train.lr=-0.0001: must be a finite number > 0"),
    ("train.iterations=0", "train.iterations=0: must be an integer >= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be an integer >= 1"),
    ("train.eval_every=-1", "train.eval_every=-1: must be an integer >= 0"),
    ("inference.clip_weight_seen=1.2", "inference.clip_weight_seen=1.2: must be a finite number >= 0 and <= 1"),
    ("inference.tasks=semantic,semantic", "inference.tasks=semantic,semantic: must be a non-empty list without repeats"),
    ("inference.tasks=depth", "inference.tasks=depth: must be a non-empty list"),
    ("model.pixel_decoder.dropout=1", "model.pixel_decoder.dropout=1.0: must be a finite number >= 0 and < 1"),
    ("loss.focal_weight=inf", "loss.focal_weight=inf: must be a finite number >= 0"),
    ("model.interaction.layer_scale_init=nan", "model.interaction.layer_scale_init=nan: must be a finite number"),
    ("data.augmentation=mosaic", "data.augmentation=mosaic: must be one of lsj, semantic"),
])
def test_out_of_range_values_are_named(override, words):
    cfg = C.apply_overrides(P.get_preset("toy"), [override])
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg)
    assert str(err.value).startswith(words), str(err.value)


def test_the_global_batch_must_split_evenly_over_the_processes():
    cfg = C.apply_overrides(P.get_preset("toy"), ["train.batch_size=6"])
    C.validate(cfg, world_size=2)
    with pytest.raises(C.ConfigError, match="train.batch_size=6: must be a multiple of the 4 processes"):
        C.validate(cfg, world_size=4)
    with pytest.raises(C.ConfigError, match="train.batch_size=6: must be a multiple of the 8 processes"):
        C.validate(cfg, world_size=8)


def test_validation_can_be_limited_to_sections():
    cfg = C.apply_overrides(P.get_preset("toy"), ["train.lr=nan"])
    C.validate(cfg, prefixes=("inference.",))  # what evaluate.py checks after training
    with pytest.raises(C.ConfigError, match="train.lr"):
        C.validate(cfg)


def test_config_diff_names_changed_settings():
    old = C.to_dict(P.get_preset("toy"))
    new = C.to_dict(C.apply_overrides(P.get_preset("toy"), ["train.lr=0.5", "model.backbone.res5_multi_grid=1,2,4"]))
    assert C.config_diff(old, new) == [("model.backbone.res5_multi_grid", (1, 1, 1), (1, 2, 4)),
                                       ("train.lr", 1e-3, 0.5)]
    del old["train"]["lr"]  # a field the old checkpoint did not have yet is not a change
    assert C.config_diff(old, new) == [("model.backbone.res5_multi_grid", (1, 1, 1), (1, 2, 4))]
