"""What the training loops in `train.py` share: data order, optimisers, schedules, checkpoints.

The loops themselves stay in `train.py`, written out step by step. This module holds the
pieces they have in common, each a plain function:

- `IterationSampler`: the data order as a pure function of (seed, iteration). Every rank
  computes the same global batch for iteration `i` and takes its slice, so a run resumed at
  iteration `i` sees exactly the data an uninterrupted run would, and 2 processes with batch 2
  see the same images as 1 process with batch 4. Augmentation seeds come from the same place.
- `build_optimizer` / `lr_factor`: AdamW with a backbone multiplier or SGD; poly or cosine
  schedules with constant warm-up (detectron2's `WarmupPolyLR` / `WarmupCosineLR` semantics).
- `save_checkpoint` / `load_checkpoint`: atomic writes; model, optimiser, iteration, config,
  random generators, all tensors and plain types, so every checkpoint loads with
  `torch.load(weights_only=True)` and loading one never runs code (freeseg/serialization.py).
- `start_from`: resume, applying what the command changed since the checkpoint (or refusing).
- `check_finite`: a non-finite loss stops training, naming the iteration and the last checkpoint.
- `load_clip`: an OpenAI CLIP (name or file) or the toy world's own tiny CLIP checkpoint.
- `alltask_step`: the all-task stage's optimisation step that train.py writes out in its loop,
  as one function for `freeseg.bench step` to time.
- `keep_freed_memory`: a malloc setting that makes CPU training faster.
"""

import ctypes
import json
import math
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from freeseg import distributed as dist
from freeseg.config import Config, TrainConfig, config_diff, to_dict
from freeseg.data.io import atomic_write
from freeseg.errors import CheckpointError, ConfigError, TrainingDiverged, UserError
from freeseg.serialization import is_torchscript, load_torch_file


# ---------------------------------------------------------------- data order


class IterationSampler(torch.utils.data.Sampler):
    """Yields, for each iteration, this rank's list of `(dataset index, augmentation seed)`.

    The global batch of iteration `i` covers positions `i*B ... i*B+B-1` of an endless stream
    made of one random permutation of the dataset per epoch, each permutation seeded by
    `(seed, epoch)`. Rank `r` of `W` takes the `r`-th of `W` equal slices.
    """

    def __init__(self, size: int, global_batch: int, seed: int, start_iter: int = 0,
                 num_iters: int | None = None, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} processes")
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.batch, self.seed = size, global_batch, seed
        self.start, self.stop = start_iter, num_iters
        self.rank, self.per_rank = rank, global_batch // world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.size)}
        return self._perms[epoch]

    def batch_at(self, it: int) -> list[tuple[int, int]]:
        first = it * self.batch + self.rank * self.per_rank
        out = []
        for pos in range(first, first + self.per_rank):
            index = int(self._perm(pos // self.size)[pos % self.size])
            out.append((index, self.seed * 1_000_003 + pos))  # a distinct augmentation seed per draw
        return out

    def __iter__(self):
        it = self.start
        while self.stop is None or it < self.stop:
            yield self.batch_at(it)
            it += 1

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**31


class SeededDataset(torch.utils.data.Dataset):
    """Items are `transform(base[index], rng)` with `rng` seeded by the sampler's augmentation seed.

    Dict items also carry that seed as "seed": the all-task losses draw their sampling points
    from it (matcher.point_generator), so they too depend on the sample alone.
    """

    def __init__(self, base, transform=None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        sample = self.base[index]
        if self.transform is not None:
            sample = self.transform(sample, np.random.default_rng(seed))
        if isinstance(sample, dict):
            sample = {**sample, "seed": seed}
        return sample


def as_list(batch: list) -> list:
    """Samples stay a list (their sizes and segment counts differ); a named function pickles."""
    return batch


def make_loader(dataset, cfg: Config, start_iter: int, collate_fn=None) -> torch.utils.data.DataLoader:
    sampler = IterationSampler(
        len(dataset), cfg.train.batch_size, cfg.train.seed, start_iter, cfg.train.iterations,
        dist.get_rank(), dist.get_world_size(),
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=collate_fn or as_list, persistent_workers=cfg.data.num_workers > 0,
    )


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    On the CPU a training step allocates and frees thousands of tensors of tens to hundreds of KiB
    through plain malloc. By default glibc serves blocks above its mmap threshold (128 KiB at
    first) with fresh mappings and returns the top of the heap to the kernel whenever more than
    128 KiB of it is free (M_TRIM_THRESHOLD), so the kernel maps and zero-fills the same memory
    again and again. Raising both thresholds (to 32 MiB and 1 GiB) keeps it in the process; the
    price is that up to 1 GiB of freed memory stays with each process. On the toy world (2-core
    machine, README) the CLIP stage ran 1.1x faster and the all-task stage 1.07x. Elsewhere than
    on Linux with glibc it does nothing. Returns whether malloc took both settings.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # 32 MiB: the largest threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
    return mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- optimisation


def build_optimizer(model: torch.nn.Module, train: TrainConfig, backbone_prefix: str = "backbone.") -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters of `model`; the backbone gets `backbone_lr_mult` x lr.

    Parameters of normalisation layers and embeddings get no weight decay, as in the official
    optimiser (Mask2Former/FreeSeg `build_optimizer`: WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0).
    """
    no_decay_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
                      torch.nn.Embedding)
    groups: dict[tuple[float, float], list] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            lr = train.lr * (train.backbone_lr_mult if full.startswith(backbone_prefix) else 1.0)
            # A scalar (CLIP's logit scale) is a temperature, not a weight: never decayed.
            wd = 0.0 if isinstance(module, no_decay_types) or p.ndim == 0 else train.weight_decay
            groups.setdefault((lr, wd), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if not param_groups:
        raise ValueError("no trainable parameters")
    if train.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=train.lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train.lr, momentum=train.momentum)
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {train.optimizer!r}")


def lr_factor(it: int, train: TrainConfig) -> float:
    """Multiplier of the base learning rate at iteration `it` (0-based)."""
    if train.schedule not in ("poly", "cosine"):
        raise ValueError(f"train.schedule must be 'poly' or 'cosine', got {train.schedule!r}")
    if it < train.warmup_iters:
        return train.warmup_factor  # constant warm-up, as the official prompt-stage config
    progress = min(it / max(train.iterations, 1), 1.0)
    if train.schedule == "poly":
        return (1.0 - progress) ** train.poly_power
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (NumPy's as its 624-word key), so
    that a checkpoint holding it loads with `torch.load(weights_only=True)`."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a checkpoint written before the state was stored as a tensor: NumPy's own tuple
        np.random.set_state(n)
    random.setstate(state["python"])


def save_checkpoint(path: Path, **payload) -> None:
    """Rank 0 writes `payload` atomically (a crash never leaves a half-written checkpoint)."""
    if dist.is_main():
        dist.atomic_torch_save(payload, str(path))


def checkpoint_stage(ckpt: dict) -> str | None:
    """The training stage a checkpoint of train.py comes from ("clip", ..., "alltask"), if it says."""
    config = ckpt.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    return train.get("stage") if isinstance(train, dict) else None


def load_checkpoint(path: str | Path, stage: str | None = None, what: str = "checkpoint") -> dict:
    """A checkpoint written by train.py (or the official-checkpoint converter), read safely.

    `stage`: the stage it must come from; another stage is a CheckpointError that names both.
    `what` names the file's role in messages ("--init checkpoint").
    """
    ckpt = load_torch_file(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{what} {path} has no 'model' entry: it was not written by train.py")
    found = checkpoint_stage(ckpt)
    if stage is not None and found != stage:
        raise CheckpointError(f"{what} {path} is a checkpoint of the {found or 'unknown'!r} stage, "
                              f"not of the {stage!r} stage")
    return ckpt


def load_clip(name: str, device: str = "cpu"):
    """(clip_model, tokenizer) for `cfg.model.clip.name`.

    A file written by `train.py --stage clip` carries its own BPE merges; anything else goes
    through `freeseg.clip.load` (OpenAI archives, plain state dicts, known model names) with
    OpenAI's vocabulary.
    """
    from freeseg import clip

    path = Path(name)
    if path.is_file() and not is_torchscript(path):
        ckpt = load_torch_file(path, "CLIP checkpoint")
        if isinstance(ckpt, dict) and "merges" in ckpt:
            stage = checkpoint_stage(ckpt)
            if stage not in (None, "clip"):
                raise CheckpointError(f"CLIP checkpoint {path} is a checkpoint of the {stage!r} stage, not a CLIP "
                                      "(train.py --dataset toy --stage clip writes one)")
            return clip.build_model(ckpt["model"]).to(device), tokenizer_for(ckpt["merges"])
    model, _ = clip.load(name, device=device)
    return model, clip.default_tokenizer()


def tokenizer_for(merges: list | None):
    """The tokenizer a checkpoint was trained with: its own BPE merges (toy world) or OpenAI's."""
    from freeseg import clip

    return clip.Tokenizer(merges=[tuple(m) for m in merges]) if merges else clip.default_tokenizer()


def mismatch(err: BaseException, limit: int = 300) -> str:
    """What `load_state_dict` found wrong, on one line: its message without the header."""
    text = re.sub(r"^Error\(s\) in loading state_dict for \w+:\s*", "", " ".join(str(err).split()))
    return text if len(text) <= limit else text[:limit] + " ..."


# Settings a resumed run cannot take from the command instead of the checkpoint: the optimiser's
# state has the old optimiser's form, and the weights and generators come from the old seed.
_FIXED_ON_RESUME = ("train.optimizer", "train.seed", "train.stage")
# Settings the optimiser keeps in its own state: a resumed run would use the checkpoint's values.
_OPTIMIZER_SETTINGS = ("train.lr", "train.weight_decay", "train.backbone_lr_mult", "train.momentum")


def start_from(out_dir: Path, resume: bool, modules: dict, optimizer, cfg: Config | None = None) -> int:
    """Load the run's checkpoint when resuming; returns the first iteration to run.

    With `cfg`, settings that differ from the checkpoint's are applied, and said: those the
    optimiser stores (learning rate, weight decay, momentum) are written into its parameter
    groups, which would otherwise keep the checkpoint's values while the new checkpoint
    records the new ones; the rest is read from `cfg` by the loop anyway. Settings that
    cannot change mid-run (optimiser, seed) are refused.
    """
    path = out_dir / "checkpoint.pt"
    if not (resume and path.exists()):
        return 0
    ckpt = load_checkpoint(path, stage=cfg.train.stage if cfg is not None else None, what="checkpoint to resume")
    changes = config_diff(ckpt.get("config") or {}, to_dict(cfg)) if cfg is not None else []
    fixed = [f"{k} {old!r} -> {new!r}" for k, old, new in changes if k in _FIXED_ON_RESUME]
    if fixed:
        raise ConfigError(f"--resume from {path}: {', '.join(fixed)} cannot change in a resumed run; "
                          "start a new run in another --output-dir")
    for key, module in modules.items():
        try:
            module.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"checkpoint to resume {path} does not fit this model (another model size?): "
                                  f"{mismatch(err)}") from None
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint to resume {path}: its optimiser state does not fit this run "
                              f"({err}); start a new run in another --output-dir") from None
    if any(k in _OPTIMIZER_SETTINGS for k, _, _ in changes):
        for group, new in zip(optimizer.param_groups, wanted):
            for name in ("initial_lr", "weight_decay", "momentum"):
                if name in new:
                    group[name] = new[name]
    set_rng_state(ckpt["rng"])
    dist.print0(f"resumed from {path} at iteration {ckpt['iteration']}")
    if changes:
        applied = "; ".join(f"{k} {old!r} -> {new!r}" + (" (optimizer groups updated)" if k in _OPTIMIZER_SETTINGS else "")
                            for k, old, new in changes)
        dist.print0(f"resume: settings changed since the checkpoint, applied from iteration {ckpt['iteration']}: {applied}")
    return ckpt["iteration"]


def check_finite(it: int, losses: dict[str, torch.Tensor], checkpoint: Path, what: str = "the loss is") -> None:
    """Stop at the first iteration whose loss (or `what`: the predictions) is not finite, on
    every rank together (the values are summed over ranks first), before the weights it
    produced can be saved. The message names the iteration, the non-finite terms and the last
    checkpoint, saved before it."""
    names = list(losses)
    values = dist.all_reduce_sum(torch.stack([losses[k].detach().float().reshape(()) for k in names]).cpu())
    bad = [f"{k}={v:g}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    if not bad:
        return
    if checkpoint.exists():
        last = f"the last checkpoint, {checkpoint} (iteration {load_checkpoint(checkpoint)['iteration']}), predates it"
        if what != "the loss is":  # the weights that gave them were made by earlier steps
            last += ", though its weights may have diverged already"
    else:
        last = f"no checkpoint was saved in {checkpoint.parent}"
    shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    raise TrainingDiverged(f"iteration {it + 1}: {what} not finite ({shown}); training stopped and {last}. "
                           "Try a lower train.lr or check the data")


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars to log, averaged over ranks (every rank must call it)."""
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().cpu() for k in keys])
    stacked = dist.all_reduce_sum(stacked) / dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


# ---------------------------------------------------------------- logging


class Logger:
    """Rank-0 console lines and a JSON-lines file of every logged metric."""

    def __init__(self, out_dir: Path, total_iters: int, start_iter: int):
        self.path = out_dir / "metrics.jsonl"
        self.total, self.start = total_iters, start_iter
        self.t0 = time.perf_counter()

    def log(self, it: int, metrics: dict[str, float]) -> None:
        if not dist.is_main():
            return
        done = it + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        speed = done / max(elapsed, 1e-9)
        eta = (self.total - it - 1) / max(speed, 1e-9)
        mem = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        record = {"iter": it + 1, **{k: round(float(v), 6) for k, v in metrics.items()},
                  "it_per_s": round(speed, 3), "eta_s": round(eta, 1), "mem_mb": round(mem, 1)}
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(f"[{it + 1}/{self.total}] {text}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, it: int) -> None:
        """On resume, forget records past the checkpoint so the file holds one clean curve."""
        if not dist.is_main() or not self.path.exists():
            return
        keep = [line for line, record in read_metrics_lines(self.path) if record["iter"] <= it]
        with atomic_write(str(self.path), "w") as f:
            f.write("".join(line + "\n" for line in keep))


def read_metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every record of a metrics log. A last line that is not JSON was torn
    by a run stopped while writing it: it is dropped with a warning naming the file. Any other
    bad line is a UserError naming the file and the line."""
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                print(f"warning: {path}: dropped its last line, torn by a run stopped while writing it "
                      f"({line[:40]!r})", file=sys.stderr, flush=True)
                continue
            raise UserError(f"{path}, line {i + 1}: not a JSON record ({err.msg}); delete or fix that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise UserError(f"{path}, line {i + 1}: a record without an integer 'iter'; delete or fix that line")
        out.append((line, record))
    return out


# ---------------------------------------------------------------- the all-task step


def alltask_step(model: torch.nn.Module, criterion, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 targets: list[dict], class_names: list[str], task: str, text_features: torch.Tensor,
                 amp: bool = False, clip_grad_norm: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Forward (bf16 autocast when `amp`), the criterion's weighted sum, backward, optional
    gradient clipping over the trainable parameters, optimiser step: the steps of train.py's
    all-task loop, which must stay the same. `model` may be wrapped in DDP.
    -> (total loss, the criterion's unweighted losses).

    Mask2Former trains in mixed precision on GPUs; its pixel decoder turns autocast off
    around the deformable attention and runs it in float32 (pixel_decoder.py does the same).
    """
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        outputs = model(images, class_names, task, text_features)
    losses = criterion(outputs, targets)
    loss = sum(criterion.weight_dict[k] * v for k, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad_norm)
    optimizer.step()
    return loss, losses


# ---------------------------------------------------------------- data parallel


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if dist.get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(module: torch.nn.Module) -> None:
    """Mean of the gradients over ranks, for modules too small to be worth wrapping in DDP."""
    world = dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    # One all-reduce of every gradient laid end to end, as DDP's buckets do: a reduction per
    # tensor waits on the other ranks once per tensor (the tiny CLIP has 120).
    flat = dist.all_reduce_sum(torch.cat([g.flatten() for g in grads])) / world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))
