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

infer: `inference.predict` of the full-size model (COCO preset, random weights, ViT-B/16-shaped
CLIP) on one random 640x480 image with 133 classes, all three tasks, under `--protocol`. Modes
(`--modes`): "previous" (`straightforward_predict`: task by task, every crop encoded), "exact"
(predict) and "fast" (predict in fast mode, freeseg/fast_inference.py), run interleaved `--repeat` times after the
text features are cached. Prints the median seconds of each stage (`StageTimer`: forward hooks
and wrappers around inference.py's building blocks; predict carries no timing code), the text
features' cold time, the crops CLIP encoded, peak memory, images per second, the speed-up over
"previous", and whether each mode's outputs equal the previous path's; then region CLIP's
seconds and GFLOP/s per crop against the machine's float32 matrix-product rate (the floor of any
float32 CLIP pass), and CLIP on 16 crops in float32 and under bfloat16 autocast (fast mode's
`clip_bfloat16`). docs/speed.md has the numbers and what the modes do.
"""

import argparse
import contextlib
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


# --- infer -------------------------------------------------------------------------------------

INFER_MODES = ("previous", "exact", "fast")


@torch.no_grad()
def straightforward_predict(model, image: torch.Tensor, class_names: list[str], unseen: torch.Tensor,
                            is_thing: torch.Tensor, cfg, text_cache: dict | None = None, hooks=None) -> dict:
    """`inference.predict` without shared crops: task by task, every non-empty mask cropped and
    encoded by CLIP on its own. The reference that exact mode must equal (tests) and the
    previous path the `infer` benchmark compares with. Same building blocks as `predict`;
    `hooks`: its extension points (default FreeSeg's inference)."""
    from freeseg.modeling import inference

    hooks = hooks or inference.PAPER

    model.eval()
    image = image.to(model.pixel_mean.device).float()
    features = model.extract(image[None])
    regions = inference.region_classifier(model, cfg, share_iou=None, hooks=hooks)
    out = {}
    for task in cfg.tasks:
        decoded = inference.decode_task(model, image, features, task, class_names, unseen, cfg, text_cache, hooks)
        masks, p_clip = None, None
        if cfg.use_clip:
            masks = inference.proposals(decoded["masks"], decoded["probs"], hooks)
            p_clip = regions(image, masks, decoded["clip_text"])
        out[task] = inference.finish_task(task, decoded, masks, p_clip, unseen, is_thing, cfg, None)
    return out


class StageTimer:
    """Seconds per stage of one inference call, measured from outside the code it times: forward
    hooks on the model's parts and wrappers around inference.py's building blocks. Nested stages
    count once: a stage's time excludes the stages inside it (the cold text features inside
    `decode_task`). On a GPU each stage boundary waits for the queued kernels.

    Stages: "backbone", "pixel decoder", "text" (the prompt learner: runs only when the text cache
    misses), "interaction + decoder/<task>" (`decode_task`: the decoder and the mask upsampling),
    "crops" (`crop_masked_regions`), "region CLIP" (CLIP's image tower), "post-processing/<task>"
    (`finish_task`: the ensemble and the task's rules). `crops_encoded` counts CLIP's images.
    """

    def __init__(self, model, device: str):
        self.model, self.cuda = model, device.startswith("cuda")
        self.times: dict[str, float] = {}
        self.crops_encoded = 0
        self._stack: list[list] = []  # [name, start, seconds of nested stages]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, name: str) -> None:
        self._stack.append([name, self._now(), 0.0])

    def leave(self) -> None:
        name, start, inner = self._stack.pop()
        seconds = self._now() - start
        self.times[name] = self.times.get(name, 0.0) + seconds - inner
        if self._stack:
            self._stack[-1][2] += seconds

    @contextlib.contextmanager
    def attached(self):
        from freeseg.modeling import inference, region_classifier

        model = self.model
        modules = {"backbone": model.backbone, "pixel decoder": model.pixel_decoder, "text": model.prompt_learner,
                   "region CLIP": model.clip_model.visual}
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: self.enter(name)))
            handles.append(module.register_forward_hook(lambda m, args, out: self.leave()))
        handles.append(model.clip_model.visual.register_forward_pre_hook(
            lambda m, args: setattr(self, "crops_encoded", self.crops_encoded + args[0].shape[0])))

        def timed(fn: Callable, stage: Callable[..., str]) -> Callable:
            def wrapper(*args, **kwargs):
                self.enter(stage(*args))
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.leave()
            return wrapper

        patches = [(inference, "decode_task", lambda model, image, features, task, *a: f"interaction + decoder/{task}"),
                   (inference, "finish_task", lambda task, *a: f"post-processing/{task}"),
                   (region_classifier, "crop_masked_regions", lambda *a: "crops")]
        originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
        try:
            for (module, name, stage), (_, _, fn) in zip(patches, originals):
                setattr(module, name, timed(fn, stage))
            yield self
        finally:
            for module, name, fn in originals:
                setattr(module, name, fn)
            for handle in handles:
                handle.remove()


def peak_memory_reset(device: str) -> None:
    """Start a new peak: the GPU's allocator statistics, or the process's peak resident set
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gib(device: str) -> float:
    """GiB: the GPU's peak allocated memory, or the process's peak resident set (VmHWM) on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def same_results(a: dict, b: dict) -> str:
    """How two predict outputs differ: the largest semantic score difference, whether the
    instance and panoptic results are equal."""
    parts = []
    if "semantic" in a:
        parts.append(f"semantic max |diff| {(a['semantic'] - b['semantic']).abs().max().item():.1e}")
    if "instance" in a:
        ia, ib = a["instance"], b["instance"]
        equal = ia["masks"].shape == ib["masks"].shape and torch.equal(ia["masks"], ib["masks"]) \
            and torch.equal(ia["labels"], ib["labels"])
        parts.append(f"instance {'equal' if equal else 'DIFFERENT'}")
    if "panoptic" in a:
        equal = torch.equal(a["panoptic"][0], b["panoptic"][0]) and \
            [(s["id"], s["category_id"]) for s in a["panoptic"][1]] == [(s["id"], s["category_id"]) for s in b["panoptic"][1]]
        parts.append(f"panoptic {'equal' if equal else 'DIFFERENT'}")
    return ", ".join(parts)


def bench_infer(device: str, threads: int, repeat: int, protocol: str, modes: list[str],
                height: int = 480, width: int = 640, num_classes: int = 133) -> None:
    """See the module docstring."""
    import copy

    from freeseg import engine
    from freeseg.config import FastConfig
    from freeseg.fast_inference import fast_hooks
    from freeseg.modeling import inference

    engine.keep_freed_memory()  # as evaluate.py runs inference
    torch.set_num_threads(threads)
    cfg, model = inference.full_size_model(0, device)
    model.eval()
    icfg = copy.deepcopy(cfg.inference)
    icfg.protocol = protocol
    hooks = {"previous": inference.PAPER, "exact": inference.PAPER,
             "fast": fast_hooks(FastConfig(enabled=True), inference.PAPER)}
    names = [f"class {i}" for i in range(num_classes)]
    unseen = torch.arange(num_classes) % 9 == 0
    is_thing = torch.arange(num_classes) < 80
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{threads} CPU thread(s)"
    print(f"predict, COCO preset (R101c, ViT-B/16-shaped CLIP, random weights), {num_classes} classes, "
          f"{height}x{width} image, tasks {', '.join(icfg.tasks)}, protocol {protocol}, {where}; "
          f"median of {repeat}, text features cached", flush=True)

    def call(mode: str, cache: dict) -> tuple[dict, StageTimer, float]:
        fn = straightforward_predict if mode == "previous" else inference.predict
        timer = StageTimer(model, device)
        with timer.attached():
            start = timer._now()
            out = fn(model, image, names, unseen, is_thing, cfg=icfg, text_cache=cache, hooks=hooks[mode])
            total = timer._now() - start
        return out, timer, total

    cache: dict = {}
    cold = StageTimer(model, device)
    with cold.attached():  # the text features of every task, into the cache the timed calls share
        for task in icfg.tasks:
            inference.region_text(model, names, task, text_cache=cache)
    runs: dict[str, list] = {mode: [] for mode in modes}
    outputs, memory = {}, {}
    for _ in range(repeat):  # modes interleaved, so that a busy machine slows each alike
        for mode in modes:
            peak_memory_reset(device)
            outputs[mode], timer, total = call(mode, cache)
            memory[mode] = peak_memory_gib(device)
            runs[mode].append((timer, total))
            print(f"  {mode}: {total:.2f} s, {timer.crops_encoded} crops", flush=True)
    print_infer_table(modes, runs, cold, memory, icfg.tasks)
    print_clip_floor(model.clip_model, modes, runs, device)
    if "previous" in outputs:
        for mode in modes:
            if mode != "previous":
                print(f"{mode} vs previous: {same_results(outputs[mode], outputs['previous'])}")


def print_infer_table(modes: list[str], runs: dict, cold: StageTimer, memory: dict, tasks) -> None:
    stages = (["backbone", "pixel decoder", "text"] + [f"interaction + decoder/{t}" for t in tasks]
              + ["crops", "region CLIP"] + [f"post-processing/{t}" for t in tasks])
    header = f"{'stage (median s)':<38}" + "".join(f"{m:>11}" for m in modes)
    print(header)
    print("-" * len(header))
    print(f"{'text, cold (all tasks, once)':<38}{cold.times.get('text', 0.0):>11.3f}")
    for stage in stages:
        label = "text, cached" if stage == "text" else stage
        print(f"{label:<38}" + "".join(f"{statistics.median(t.times.get(stage, 0.0) for t, _ in runs[m]):>11.3f}"
                                         for m in modes))
    totals = {m: statistics.median(total for _, total in runs[m]) for m in modes}
    other = {m: statistics.median(total - sum(t.times.values()) for t, total in runs[m]) for m in modes}
    rows = [("other (ensemble, mask hashing, ...)", {m: f"{other[m]:.3f}" for m in modes}),
            ("total", {m: f"{totals[m]:.3f}" for m in modes}),
            ("crops encoded", {m: str(int(statistics.median(t.crops_encoded for t, _ in runs[m]))) for m in modes}),
            ("peak memory GiB", {m: f"{memory[m]:.2f}" for m in modes}),
            ("images / s", {m: f"{1 / totals[m]:.4f}" for m in modes})]
    if "previous" in modes:
        rows.append(("speed-up vs previous", {m: f"{totals['previous'] / totals[m]:.2f}x" for m in modes}))
    for label, values in rows:
        print(f"{label:<38}" + "".join(f"{values[m]:>11}" for m in modes))


def vit_gflop_per_crop(visual) -> float:
    """Floating-point operations (GFLOP, a multiply-add counts two) of a ViT image tower
    (clip.model.VisionTransformer) on one crop: per layer the query-key-value and output
    projections and the 4x MLP (24 T W^2) and attention's two products (4 T^2 W), for T tokens of
    width W; the patch convolution and the final projection."""
    tokens, width = visual.positional_embedding.shape
    layers = len(visual.transformer.resblocks)
    patch = visual.conv1.kernel_size[0]
    return (layers * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)
            + 2 * (tokens - 1) * 3 * patch ** 2 * width + 2 * width * visual.proj.shape[1]) / 1e9


def matmul_gflops(device: str, repeat: int = 5) -> float:
    """This machine's float32 matrix-product rate (GFLOP/s, median of `repeat`): a 6304 x 768 by
    768 x 3072 product, the size of ViT-B/16's MLP on 32 crops."""
    a = torch.randn(6304, 768, device=device)
    b = torch.randn(768, 3072, device=device)
    return 2 * 6304 * 768 * 3072 / median_seconds(lambda: a @ b, repeat, device) / 1e9


def print_clip_floor(clip_model, modes: list[str], runs: dict, device: str) -> None:
    """Region CLIP's time per crop and rate against the machine's matrix-product rate: the least
    time that any float32 implementation needs for a given number of crops; and CLIP's time per
    crop in float32 and in bfloat16 (fast mode's `clip_bfloat16`)."""
    from functools import partial

    from freeseg.fast_inference import encode_in_bfloat16
    from freeseg.modeling.region_classifier import encode_crops
    gflop, rate = vit_gflop_per_crop(clip_model.visual), matmul_gflops(device)
    per_crop = {}
    for m in modes:
        crops = statistics.median(t.crops_encoded for t, _ in runs[m])
        if crops:
            per_crop[m] = statistics.median(t.times.get("region CLIP", 0.0) for t, _ in runs[m]) / crops
    print(f"{'region CLIP s / crop':<38}" + "".join(f"{per_crop[m]:>11.3f}" if m in per_crop else f"{'-':>11}"
                                                    for m in modes))
    print(f"{'region CLIP GFLOP/s':<38}" + "".join(f"{gflop / per_crop[m]:>11.1f}" if m in per_crop else f"{'-':>11}"
                                                   for m in modes))
    print(f"CLIP's image tower: {gflop:.1f} GFLOP a crop; float32 matrix product here: {rate:.1f} GFLOP/s "
          f"(6304x768 @ 768x3072, median of 5), so 100 crops take at least {100 * gflop / rate:.1f} s at "
          f"that rate (300: {300 * gflop / rate:.1f} s)")
    crops = torch.randn(16, 3, clip_model.input_resolution, clip_model.input_resolution,
                        generator=torch.Generator().manual_seed(0)).to(device)
    seconds, features = {}, {}
    for name, encode in (("float32", encode_crops), ("bfloat16", partial(encode_in_bfloat16, encode_crops))):
        with torch.no_grad():
            seconds[name] = median_seconds(lambda: features.__setitem__(name, encode(clip_model, crops)), 3, device)
    cosine = float((features["float32"] * features["bfloat16"]).sum(-1).min())
    print(f"CLIP on 16 crops at once: float32 {seconds['float32'] / 16:.3f} s a crop, bfloat16 autocast "
          f"(fast.clip_bfloat16) {seconds['bfloat16'] / 16:.3f} s a crop "
          f"({seconds['float32'] / seconds['bfloat16']:.2f}x; features' cosine to float32's >= {cosine:.4f})")


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
        bench_infer(args.device, args.threads, args.repeat, args.protocol, list(dict.fromkeys(args.modes)))
    elif args.bench == "prompts":
        bench_prompts(args.device, args.threads, args.repeat)
    else:
        bench_step(args.device, args.batch, args.repeat)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m freeseg.bench"))
