"""Tests of `freeseg/engine.py`: data order, schedules, optimiser groups, checkpoints, logger.

The data-order tests pin the promise train.py relies on: the global batch of iteration i is a
pure function of (seed, i), whatever the number of processes and wherever a run resumed.
"""

import json
import math
import platform
import random
import sys
from itertools import islice

import numpy as np
import pytest
import torch
from torch import nn

from freeseg import engine
from freeseg.config import Config, TrainConfig


def _take(sampler: engine.IterationSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(islice(iter(sampler), n))


# ---------------------------------------------------------------- IterationSampler


@pytest.mark.parametrize("size", [10, 7])
def test_two_ranks_see_the_global_batch_of_one_process(size):
    one = engine.IterationSampler(size, global_batch=4, seed=3, num_iters=12)
    rank0 = engine.IterationSampler(size, global_batch=4, seed=3, num_iters=12, rank=0, world_size=2)
    rank1 = engine.IterationSampler(size, global_batch=4, seed=3, num_iters=12, rank=1, world_size=2)
    whole, first, second = list(one), list(rank0), list(rank1)
    assert len(whole) == len(first) == len(second) == 12
    for it in range(12):
        assert len(first[it]) == len(second[it]) == 2
        assert first[it] + second[it] == whole[it], f"iteration {it}"  # indices and aug seeds alike


def test_resumed_sampler_continues_the_uninterrupted_stream():
    full = _take(engine.IterationSampler(9, global_batch=4, seed=5), 20)
    for k in (1, 2, 7, 13):  # 13*4 = 52 draws: resuming inside the 6th epoch of 9 images
        resumed = engine.IterationSampler(9, global_batch=4, seed=5, start_iter=k, num_iters=20)
        assert len(resumed) == 20 - k
        assert list(resumed) == full[k:]


@pytest.mark.parametrize("size,batch", [(12, 4), (10, 4), (7, 3)])
def test_each_epoch_is_a_permutation_of_the_dataset(size, batch):
    epochs = 5
    iters = math.ceil(epochs * size / batch)
    stream = [i for b in _take(engine.IterationSampler(size, batch, seed=1), iters) for i, _ in b]
    orders = [stream[e * size:(e + 1) * size] for e in range(epochs)]
    for e, order in enumerate(orders):
        assert sorted(order) == list(range(size)), f"epoch {e} is not a permutation: {order}"
    assert len({tuple(o) for o in orders}) > 1, "every epoch has the same order: no reshuffle"
    assert orders[0] != list(range(size)), "the data is not shuffled"


def test_seed_changes_the_order_and_augmentation_seeds_are_distinct():
    a = _take(engine.IterationSampler(10, 4, seed=0), 25)
    b = _take(engine.IterationSampler(10, 4, seed=1), 25)
    assert [i for batch in a for i, _ in batch] != [i for batch in b for i, _ in batch]
    # Two ranks, 25 iterations: 100 draws, 10 epochs of the same 10 images, 100 different seeds.
    seeds = [s for r in (0, 1)
             for batch in _take(engine.IterationSampler(10, 4, seed=0, rank=r, world_size=2), 25)
             for _, s in batch]
    assert len(seeds) == 100 and len(set(seeds)) == 100


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by 2"):
        engine.IterationSampler(10, global_batch=5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        engine.IterationSampler(0, global_batch=4, seed=0)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        return index


def test_make_loader_yields_the_same_augmented_samples_after_a_resume():
    cfg = Config()
    cfg.train.batch_size, cfg.train.iterations, cfg.train.seed = 4, 8, 11
    cfg.data.num_workers = 0

    def augment(sample: int, rng: np.random.Generator) -> tuple[int, int]:
        return sample, int(rng.integers(1 << 30))  # the rng stands in for a random crop/flip

    data = engine.SeededDataset(_Numbers(), augment)
    full = list(engine.make_loader(data, cfg, start_iter=0))
    resumed = list(engine.make_loader(data, cfg, start_iter=5))
    assert len(full) == 8 and all(len(b) == 4 for b in full)
    assert resumed == full[5:]
    assert len({draw for b in full for _, draw in b}) == 32  # a fresh augmentation for every draw


def test_seeded_dataset_dict_items_carry_their_augmentation_seed():
    data = engine.SeededDataset(_Numbers(), lambda sample, rng: {"value": sample, "draw": int(rng.integers(1 << 30))})
    item = data[(3, 1234)]
    assert item["seed"] == 1234 and item["draw"] == int(np.random.default_rng(1234).integers(1 << 30))
    assert engine.SeededDataset(_Numbers())[(3, 1234)] == _Numbers()[3]  # other items are left alone


# ---------------------------------------------------------------- learning-rate schedules


def test_poly_schedule_hand_values():
    train = TrainConfig(iterations=100, schedule="poly", poly_power=0.9, warmup_iters=0)
    expected = {0: 1.0, 25: 0.7718895067235705, 50: 0.5358867312681466,  # 0.75**0.9, 0.5**0.9
                90: 0.12589254117941673, 100: 0.0, 150: 0.0}  # 0.1**0.9; clamped past the end
    for it, value in expected.items():
        assert engine.lr_factor(it, train) == pytest.approx(value, abs=1e-12), f"iteration {it}"


def test_cosine_schedule_with_constant_warmup_hand_values():
    # The COCO prompt-stage settings: 100 warm-up iterations at 0.005, then cosine.
    train = TrainConfig(iterations=1000, schedule="cosine", warmup_iters=100, warmup_factor=0.005)
    for it in (0, 1, 50, 99):
        assert engine.lr_factor(it, train) == 0.005
    expected = {100: 0.9755282581475768, 250: 0.8535533905932737,  # (1+cos(pi/10))/2, (1+cos(pi/4))/2
                500: 0.5, 750: 0.14644660940672627, 1000: 0.0}  # (1+cos(3pi/4))/2
    for it, value in expected.items():
        assert engine.lr_factor(it, train) == pytest.approx(value, abs=1e-12), f"iteration {it}"


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="'step'"):
        engine.lr_factor(10, TrainConfig(schedule="step"))


# ---------------------------------------------------------------- optimiser


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(parameter) -> its param group; asserts that no parameter sits in two groups."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter appears in two groups"
            out[id(p)] = group
    return out


def test_adamw_groups_backbone_lr_and_no_decay_on_norms():
    net = _Net()
    train = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    opt = engine.build_optimizer(net, train)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _group_of(opt)
    expected = {  # name -> (lr, weight decay)
        "backbone.0.weight": (1e-4, 0.05), "backbone.0.bias": (1e-4, 0.05),
        "backbone.1.weight": (1e-4, 0.0), "backbone.1.bias": (1e-4, 0.0),
        "head.weight": (1e-3, 0.05), "head.bias": (1e-3, 0.05),
        "norm.weight": (1e-3, 0.0), "norm.bias": (1e-3, 0.0),
    }
    params = dict(net.named_parameters())
    assert set(groups) == {id(params[n]) for n in expected}, "frozen parameters must be left out"
    for name, (lr, wd) in expected.items():
        g = groups[id(params[name])]
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == pytest.approx(lr), name
        assert g["weight_decay"] == wd, name


def test_sgd_has_momentum_and_decays_conv_weights():
    net = _Net()
    train = TrainConfig(optimizer="sgd", lr=0.02, weight_decay=1e-3, momentum=0.9, backbone_lr_mult=1.0)
    opt = engine.build_optimizer(net, train)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    groups = _group_of(opt)
    assert groups[id(net.backbone[0].weight)]["weight_decay"] == 1e-3
    assert groups[id(net.head.weight)]["lr"] == pytest.approx(0.02)


def test_optimizer_rejects_no_trainable_params_and_unknown_names():
    net = _Net()
    with pytest.raises(ValueError, match="'lamb'"):
        engine.build_optimizer(net, TrainConfig(optimizer="lamb"))
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        engine.build_optimizer(net, TrainConfig())


def test_set_lr_scales_every_group_from_its_initial_lr():
    net = _Net()
    opt = engine.build_optimizer(net, TrainConfig(lr=1e-3, backbone_lr_mult=0.1))
    engine.set_lr(opt, 0.5)
    engine.set_lr(opt, 0.25)  # factors replace each other, they do not compound
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[0] == pytest.approx(0.25e-4) and lrs[-1] == pytest.approx(0.25e-3)
    assert all(g["lr"] == pytest.approx(0.25 * g["initial_lr"]) for g in opt.param_groups)


def test_decoder_query_embeddings_get_no_weight_decay():
    decoder = nn.Module()
    decoder.query_feat = nn.Embedding(5, 8)
    decoder.query_embed = nn.Embedding(5, 8)
    decoder.level_embed = nn.Embedding(3, 8)
    net = nn.Module()
    net.decoder = decoder
    opt = engine.build_optimizer(net, TrainConfig(optimizer="adamw", weight_decay=0.05))
    groups = _group_of(opt)
    for name, p in net.named_parameters():
        assert groups[id(p)]["weight_decay"] == 0.0, name


# ---------------------------------------------------------------- checkpoints and rng


def test_checkpoint_round_trip_is_atomic(tmp_path):
    net = _Net()
    opt = engine.build_optimizer(net, TrainConfig())
    path = tmp_path / "run" / "checkpoint.pt"  # the run directory does not exist yet
    engine.save_checkpoint(path, model=net.state_dict(), optimizer=opt.state_dict(), iteration=7,
                           rng=engine.rng_state(), config={"train": {"lr": 1e-3}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"], "temporary file left behind"
    ckpt = engine.load_checkpoint(path)
    assert ckpt["iteration"] == 7 and ckpt["config"] == {"train": {"lr": 1e-3}}
    for key, value in net.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key
    fresh = engine.build_optimizer(_Net(), TrainConfig())
    fresh.load_state_dict(ckpt["optimizer"])  # same groups, in the same order
    assert [g["initial_lr"] for g in fresh.param_groups] == [g["initial_lr"] for g in opt.param_groups]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        engine.load_checkpoint(missing)
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.arange(1000.0)}}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        engine.load_checkpoint(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt"):
        engine.load_checkpoint(empty)
    no_model = tmp_path / "weights_only.pt"
    torch.save({"state_dict": {}}, no_model)
    with pytest.raises(ValueError, match="weights_only.pt.*'model'"):
        engine.load_checkpoint(no_model)


def test_load_checkpoint_on_a_text_file_names_the_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello world\n")
    with pytest.raises(ValueError, match="notes.pt"):
        engine.load_checkpoint(text)


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


def test_rng_state_round_trip_reproduces_draws(tmp_path):
    state = engine.rng_state()
    first = _draws()
    _draws()  # move every generator on
    torch.save({"rng": state}, tmp_path / "rng.pt")  # as it travels inside a checkpoint
    engine.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False)["rng"])
    again = _draws()
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


# ---------------------------------------------------------------- logger


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logger_writes_json_lines_and_truncates_on_resume(tmp_path, capsys):
    logger = engine.Logger(tmp_path, total_iters=10, start_iter=0)
    for it in range(10):
        logger.log(it, {"loss": 1.0 / (it + 1)})
    assert "[10/10]" in capsys.readouterr().out
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records] == list(range(1, 11))  # iter counts finished iterations
    for r in records:
        assert {"iter", "loss", "it_per_s", "eta_s"} <= set(r)
        assert r["loss"] == pytest.approx(1.0 / r["iter"], abs=1e-6)
        assert r["it_per_s"] > 0 and r["eta_s"] >= 0
    assert records[-1]["eta_s"] == 0.0

    # Resume from the checkpoint of iteration 6: records 7..10 belong to the abandoned run.
    resumed = engine.Logger(tmp_path, total_iters=10, start_iter=6)
    resumed.truncate_after(6)
    assert [r["iter"] for r in _records(tmp_path / "metrics.jsonl")] == list(range(1, 7))
    resumed.log(6, {"loss": 0.5})
    assert [r["iter"] for r in _records(tmp_path / "metrics.jsonl")] == list(range(1, 8))
    assert not (tmp_path / "metrics.tmp").exists()


def test_logger_truncate_without_a_file_is_a_no_op(tmp_path):
    engine.Logger(tmp_path, total_iters=5, start_iter=0).truncate_after(3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_keep_freed_memory_is_taken_by_glibc_and_tensors_still_work():
    assert engine.keep_freed_memory()  # mallopt accepted both thresholds
    x = torch.randn(64, 1024)  # 256 KiB blocks, above glibc's default mmap threshold
    for _ in range(3):
        x = (x * 2).sigmoid()
    assert torch.isfinite(x).all()


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss": 0.5}\n{"iter": 3, "lo')
    engine.Logger(tmp_path, total_iters=5, start_iter=2).truncate_after(2)
    assert f"warning: {log}: dropped its last line" in capsys.readouterr().err
    assert [r["iter"] for r in _records(log)] == [1, 2]


def test_a_damaged_line_inside_the_log_is_an_error_naming_file_and_line(tmp_path):
    from freeseg.errors import UserError

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iter": 1}\n{"iter": 2, "lo\n{"iter": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a JSON record"):
        engine.Logger(tmp_path, total_iters=5, start_iter=3).truncate_after(3)
    assert log.read_text().count("\n") == 3  # left as it was


def test_check_finite_names_the_iteration_terms_and_last_checkpoint(tmp_path):
    from freeseg.errors import TrainingDiverged

    ckpt = tmp_path / "checkpoint.pt"
    engine.check_finite(4, {"loss": torch.tensor(1.5), "loss_ce": torch.tensor(0.2)}, ckpt)  # finite: no error
    with pytest.raises(TrainingDiverged, match=r"iteration 5: .*loss=nan, loss_dice=inf.*no checkpoint was saved"):
        engine.check_finite(4, {"loss": torch.tensor(float("nan")), "loss_ce": torch.tensor(0.2),
                                "loss_dice": torch.tensor(float("inf"))}, ckpt)
    engine.save_checkpoint(ckpt, model={}, iteration=4)
    with pytest.raises(TrainingDiverged, match=rf"the last checkpoint, {ckpt} \(iteration 4\), predates it"):
        engine.check_finite(6, {"loss": torch.tensor(float("-inf"))}, ckpt)


def _saved_run(tmp_path, train: TrainConfig) -> tuple:
    from freeseg.config import Config, to_dict

    torch.manual_seed(0)
    net = _Net()
    opt = engine.build_optimizer(net, train)
    cfg = Config(train=train)
    engine.save_checkpoint(tmp_path / "checkpoint.pt", model=net.state_dict(), optimizer=opt.state_dict(),
                           iteration=3, rng=engine.rng_state(), config=to_dict(cfg))
    return net, opt


def test_resume_with_a_new_learning_rate_updates_the_optimizer_and_says_so(tmp_path, capsys):
    import copy

    from freeseg.config import Config

    train = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    _saved_run(tmp_path, train)
    changed = copy.deepcopy(train)
    changed.lr, changed.weight_decay = 2e-3, 0.01
    net = _Net()
    opt = engine.build_optimizer(net, changed)
    assert engine.start_from(tmp_path, True, {"model": net}, opt, Config(train=changed)) == 3
    groups = _group_of(opt)
    assert groups[id(net.head.weight)]["initial_lr"] == pytest.approx(2e-3)
    assert groups[id(net.backbone[0].weight)]["initial_lr"] == pytest.approx(2e-4)
    assert groups[id(net.head.weight)]["weight_decay"] == 0.01 and groups[id(net.norm.weight)]["weight_decay"] == 0.0
    out = capsys.readouterr().out
    assert "train.lr 0.001 -> 0.002 (optimizer groups updated)" in out
    assert "train.weight_decay 0.05 -> 0.01 (optimizer groups updated)" in out


def test_resume_with_the_same_settings_changes_nothing(tmp_path, capsys):
    from freeseg.config import Config

    train = TrainConfig(optimizer="sgd", lr=0.02, weight_decay=1e-3, momentum=0.9)
    _, saved = _saved_run(tmp_path, train)
    net = _Net()
    opt = engine.build_optimizer(net, train)
    engine.start_from(tmp_path, True, {"model": net}, opt, Config(train=train))
    assert opt.state_dict()["param_groups"] == saved.state_dict()["param_groups"]
    assert "settings changed" not in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("optimizer", "sgd"), ("seed", 7)])
def test_resume_refuses_what_cannot_change_mid_run(tmp_path, key, value):
    import copy

    from freeseg.config import Config
    from freeseg.errors import ConfigError

    train = TrainConfig(optimizer="adamw")
    _saved_run(tmp_path, train)
    changed = copy.deepcopy(train)
    setattr(changed, key, value)
    net = _Net()
    with pytest.raises(ConfigError, match=rf"train.{key} .* cannot change in a resumed run"):
        engine.start_from(tmp_path, True, {"model": net}, engine.build_optimizer(net, changed), Config(train=changed))
