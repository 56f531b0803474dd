"""Distributed helpers: torchrun initialisation, rank queries, reductions, atomic file writes.

Everything here degrades to a no-op in a plain `python train.py` run, so the training and
evaluation loops call these helpers unconditionally and read the same on CPU, one GPU and
`torchrun --nproc_per_node=N` (the pattern of torchvision's
`references/segmentation/utils.py`).

Differences from the official FreeSeg code: detectron2's `comm` module and launcher are replaced
by torchrun's environment variables; `print` is never monkey-patched (use `print0`).
"""

import json
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from freeseg.data.io import atomic_write


_alone = False  # True while rank 0 runs a stage by itself (`run_alone`)


def is_distributed() -> bool:
    """True inside an initialised process group (world size may still be 1), unless rank 0 is
    running a stage alone."""
    return dist.is_available() and dist.is_initialized() and not _alone


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables.

    `device` forces "cpu" (gloo) or "cuda" (nccl); by default CUDA is used when available.
    Without torchrun's variables this is a single process: nothing is initialised. A second
    call returns the same answer without joining again.
    Returns (rank, world_size, local_rank, device).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"init_distributed(device={device!r}): CUDA is not available")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or _alone:
        return 0, 1, 0, torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.is_initialized():  # joined already (the toy pipeline runs its stages in one process group)
        return rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        # One GPU per process; set before init so NCCL and all_gather_object use the right one.
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    # init_method "env://" reads MASTER_ADDR / MASTER_PORT, which torchrun sets.
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, local_rank, dev


def run_alone(fn: Callable[[], Any]) -> Any:
    """Call `fn` on rank 0 as a single process with every rank's threads, while the other ranks
    wait; returns what it returns (None on the other ranks). Inside, every helper of this module
    answers as in a plain `python` run: rank 0 of 1, reductions are no-ops.

    For a stage that one process runs faster or better than several (the tiny CLIP learns from
    one 64-image batch whose image tower's BatchNorm sees all of it), within a torchrun job.
    """
    global _alone
    if not is_distributed():
        return fn()
    result = None
    if is_main():
        threads = torch.get_num_threads()
        torch.set_num_threads(threads * get_world_size())  # the cores the other ranks leave idle
        _alone = True
        try:
            result = fn()
        finally:
            _alone = False
            torch.set_num_threads(threads)
    barrier()
    return result


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only (flushed, so torchrun's interleaved logs stay readable)."""
    if is_main():
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (no-op in a single process).

    NCCL only reduces CUDA tensors, so CPU accumulators (confusion matrices, PQ counts) take a
    round trip through the current GPU.
    """
    if get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        buffer = tensor.cuda()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        tensor.copy_(buffer.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """List of `obj` from every rank, in rank order (`[obj]` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (B, ...) stacked in rank order (W*B, ...); `x` itself in a single process.

    Only this rank's rows carry a gradient (the others arrive as plain numbers), so a loss
    computed alike on every rank from the gathered rows, backpropagated on each and its
    gradients summed over ranks, has the gradient of the loss on the whole batch: each rank
    contributes the part that flows through its own rows (open_clip's `gather_features` without
    `gather_with_grad` does the same).
    """
    if get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[get_rank()] = x
    return torch.cat(parts)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that never leaves a partial file. Call it on rank 0 only."""
    with atomic_write(os.fspath(path), "wb") as f:
        torch.save(obj, f)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON, atomically (strict JSON: NaN is rejected, use None)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_write(os.fspath(path), "w") as f:
        f.write(text)
