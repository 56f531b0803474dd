"""Benchmarks. `python -m freeseg.bench msda [--threads 2] [--repeat 5]`, `python -m freeseg.bench step`,
`python -m freeseg.bench prompts`, `python -m freeseg.bench infer [--protocol official] [--device cuda]`.

msda: multi-scale deformable attention at the size of FreeSeg's pixel-decoder encoder layer
(Deformable DETR's defaults as used by Mask2Former and FreeSeg): batch 1, a 640x640
input gives res3..res5 maps of 80x80, 40x40 and 20x20 (strides 8, 16, 32), S = 8400 tokens,
every token is a query (Lq = S), 8 heads, 4 points per level, head dim 32 (256 channels / 8).
Prints the median time of forward and forward+backward for each available backend, the
speed-ups over the PyTorch reference on the same device, and the largest difference of the
output and of the three gradients from the reference (float32: expect ~1e-5 relative; the
location gradients are in units of 1/W, so their absolute values and differences are large).

step: one all-task training iteration of the full-size model (COCO preset: R101c backbone,
6-layer deformable encoder, 9-layer decoder, 100 queries, ViT-B/16-shaped CLIP; random
weights) on a synthetic batch of `--batch` 640x640 images with 10 random box-shaped targets
each and the 156 seen COCO-Stuff classes, through `engine.alltask_step` (the code train.py
runs), bf16 autocast on a GPU as the preset says. Prints the median seconds per iteration per
task, the peak GPU memory and what 60k iterations of the official recipe (global batch 32)
would take at that speed on 32 / batch such devices.

prompts: the prompt learner's text features of the 171 COCO-Stuff classes through ViT-B/16's
text tower (width 512, 12 layers, 8 heads; random weights), with the COCO preset's 16 class-context
and 8 task vectors: forward and forward+backward (to the prompts) of the whole sequences
(`PromptLearner.sequences` + `CLIP.encode_text_embeddings`) against the path the learner takes,
which computes the tokens every prompt shares once (`CLIP.encode_text_shared_prefix`). Prints the
median times, the speed-up and the largest difference of the features.

infer: `inference.predict` of the full-size model, stage by stage, in exact and fast mode
(freeseg/bench_infer.py).
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from freeseg.errors import ConfigError, run_cli
from freeseg.ops.ms_deform_attn import kernel_available, ms_deform_attn


def encoder_inputs(device: str, seed: int = 0) -> tuple:
    """Random inputs of one encoder layer at 640x640: locations in [0, 1], softmaxed weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[80, 80], [40, 40], [20, 20]])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    B, S, M, D, L, P = 1, int((shapes[:, 0] * shapes[:, 1]).sum()), 8, 32, 3, 4
    value = torch.randn(B, S, M, D, generator=gen)  # (B, S, M, D)
    locations = torch.rand(B, S, M, L, P, 2, generator=gen)  # (B, Lq, M, L, P, 2)
    weights = torch.randn(B, S, M, L * P, generator=gen).softmax(-1).view(B, S, M, L, P)
    return tuple(t.to(device) for t in (value, shapes, starts, locations, weights))


def median_seconds(fn: Callable[[], None], repeat: int, device: str) -> float:
    """Median wall time of `fn` over `repeat` runs after one warm-up run."""
    times = []
    for run in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if run > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_backend(backend: str, device: str, repeat: int) -> dict:
    value, shapes, starts, locations, weights = encoder_inputs(device)
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3],
                           generator=torch.Generator().manual_seed(1)).to(device)  # (B, Lq, M*D)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def forward() -> None:
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        out.backward(grad_out)

    result = {"forward": median_seconds(forward, repeat, device),
              "forward_backward": median_seconds(forward_backward, repeat, device)}
    out = ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)
    result["tensors"] = [out.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]
    return result


def bench_msda(threads: int, repeat: int) -> None:
    torch.set_num_threads(threads)
    runs = [("pytorch", "cpu")]
    if kernel_available("cpu"):
        runs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        runs.append(("pytorch", "cuda"))
        if kernel_available("cuda"):
            runs.append(("cuda", "cuda"))
    print(f"ms_deform_attn, batch 1, levels 80x80 40x40 20x20 (S = Lq = 8400), 8 heads, 4 points, D 32, "
          f"float32; {threads} CPU thread(s), median of {repeat}")
    if not kernel_available("cpu"):
        print("(CPU kernel not built: only the reference is timed)")
    header = (f"{'backend':<10}{'device':<8}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd x':>7}{'fwd+bwd x':>11}"
              "   max |diff| vs reference (out, grad value, grad loc, grad weight)")
    print(header)
    print("-" * len(header))
    baseline = {}
    for backend, device in runs:
        result = run_backend(backend, device, repeat)
        if backend == "pytorch":
            baseline[device] = result
        ref = baseline[device]
        speedup = {key: ref[key] / result[key] for key in ("forward", "forward_backward")}
        diffs = ", ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(result["tensors"], ref["tensors"]))
        print(f"{backend:<10}{device:<8}{result['forward'] * 1e3:>9.1f}{result['forward_backward'] * 1e3:>12.1f}"
              f"{speedup['forward']:>6.1f}x{speedup['forward_backward']:>10.1f}x   {diffs}")


def synthetic_batch(batch: int, size: int, num_classes: int, device: str, seed: int = 0) -> tuple:
    """`batch` random images (B, 3, size, size) in 0-255 and per image 10 random boxes as masks."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen).float()
    targets = []
    for _ in range(batch):
        masks = torch.zeros(10, size, size, dtype=torch.bool)
        for mask, (y, x, h, w) in zip(masks, torch.randint(0, size // 2, (10, 4), generator=gen).tolist()):
            mask[y:y + h + 8, x:x + w + 8] = True
        labels = torch.randint(0, num_classes, (10,), generator=gen)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return images.to(device), targets


def bench_step(device: str, batch: int, repeat: int, size: int = 640) -> None:
    from freeseg import engine
    from freeseg.modeling.criterion import build_criterion
    from freeseg.modeling.inference import full_size_model
    from freeseg.modeling.targets import TASKS

    cfg, model = full_size_model(0, device)
    model.freeze_prompts()
    model.train()
    names = [f"class {i}" for i in range(156)]  # COCO-Stuff's seen classes
    images, targets = synthetic_batch(batch, size, len(names), device)
    criterion = build_criterion(cfg.loss)
    optimizer = engine.build_optimizer(model, cfg.train)
    amp = cfg.train.amp and device == "cuda"
    print(f"all-task step, COCO preset, batch {batch} x {size}x{size}, {len(names)} classes, "
          f"{'bf16 autocast' if amp else 'float32'}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; "
          f"median of {repeat} after one warm-up")
    print(f"{'task':<10}{'s / iter':>10}{'peak GiB':>10}")
    medians = []
    for task in TASKS:
        with torch.no_grad():
            text = model.text_features(names, task)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            engine.alltask_step(model, criterion, optimizer, images, targets, names, task, text, amp,
                                cfg.train.clip_grad_norm)

        seconds = median_seconds(step, repeat, device)
        medians.append(seconds)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        print(f"{task:<10}{seconds:>10.3f}{peak:>10.1f}")
    per_iter = statistics.mean(medians)  # the task is drawn uniformly per iteration
    devices = cfg.train.batch_size / batch
    hours = cfg.train.iterations * per_iter / 3600
    print(f"mean over tasks {per_iter:.3f} s / iter: {cfg.train.iterations} iterations of global batch "
          f"{cfg.train.batch_size} take ~{hours:.1f} h on {devices:g} such devices (compute only, no data loading)")


def bench_prompts(device: str, threads: int, repeat: int) -> None:
    import torch.nn.functional as F

    from freeseg.clip import CLIP, default_tokenizer
    from freeseg.data.categories import class_names, get_categories
    from freeseg.modeling.prompts import PromptLearner

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # ViT-B/16's text tower (OpenAI's CLIP(...) arguments); a one-layer image tower, never run.
    clip_model = CLIP(512, 224, 1, 64, 16, 77, 49408, 512, 8, 12).to(device).eval()
    learner = PromptLearner(clip_model, default_tokenizer(), class_ctx=16, task_ctx=8).to(device)
    names = class_names(get_categories("coco"))
    head, tails, _ = learner.parts(names, "semantic")
    grad_out = torch.randn(len(names), clip_model.embed_dim, device=device)

    def whole() -> torch.Tensor:
        x, eot = learner.sequences(names, "semantic")
        return F.normalize(clip_model.encode_text_embeddings(x, eot).float(), dim=-1)

    def shared() -> torch.Tensor:
        return learner(names, "semantic")

    print(f"prompt learner, {len(names)} COCO-Stuff classes, ViT-B/16 text tower (random weights), "
          f"{head.shape[0]} shared + {tails.shape[1]} own tokens per prompt, float32, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else f'{threads} CPU thread(s)'}; median of {repeat}")
    header = f"{'path':<16}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd x':>7}{'fwd+bwd x':>11}"
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        diff = (whole() - shared()).abs().max().item()
    baseline = None
    for name, fn in (("whole sequences", whole), ("shared prefix", shared)):
        with torch.no_grad():
            forward = median_seconds(fn, repeat, device)
        both = median_seconds(lambda: (fn() * grad_out).sum().backward(), repeat, device)
        baseline = baseline or (forward, both)
        print(f"{name:<16}{forward * 1e3:>9.1f}{both * 1e3:>12.1f}{baseline[0] / forward:>6.1f}x"
              f"{baseline[1] / both:>10.1f}x")
    print(f"max |difference| of the L2-normalised features: {diff:.1e}")


INFER_MODES = ("previous", "exact", "fast")  # freeseg/bench_infer.py


def check_args(args: argparse.Namespace) -> None:
    """Options checked before any work, each error naming the option."""
    for flag in ("threads", "repeat", "batch"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value}: must be at least 1")
    device = getattr(args, "device", "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: must be cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    msda = sub.add_parser("msda", help="multi-scale deformable attention: reference vs kernels")
    msda.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    msda.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median)")
    step = sub.add_parser("step", help="one all-task training iteration of the full-size model")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--batch", type=int, default=4, help="images per device (official: 32 over 8 GPUs)")
    step.add_argument("--repeat", type=int, default=5, help="timed iterations per task (median)")
    prompts = sub.add_parser("prompts", help="prompt learner: whole sequences vs the shared prefix")
    prompts.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    prompts.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    prompts.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    infer = sub.add_parser("infer", help="predict on one image with the full-size model: time per stage")
    infer.add_argument("--device", default="cpu", help="cpu or cuda")
    infer.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    infer.add_argument("--repeat", type=int, default=1, help="timed calls per mode (median)")
    infer.add_argument("--protocol", default="mask2former", choices=["mask2former", "official"],
                       help="inference rules (docs/differences.md)")
    infer.add_argument("--modes", nargs="+", default=list(INFER_MODES), choices=INFER_MODES,
                       help="previous: task by task, every crop encoded; exact: predict; fast: predict in fast mode")
    for sub_parser in (msda, step, prompts, infer):
        sub_parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    check_args(args)
    if args.bench == "msda":
        bench_msda(args.threads, args.repeat)
    elif args.bench == "infer":
        from freeseg.bench_infer import bench_infer

        bench_infer(args.device, args.threads, args.repeat, args.protocol, list(dict.fromkeys(args.modes)))
    elif args.bench == "prompts":
        bench_prompts(args.device, args.threads, args.repeat)
    else:
        bench_step(args.device, args.batch, args.repeat)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m freeseg.bench"))
