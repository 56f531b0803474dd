"""The inference benchmark: `python -m freeseg.bench infer [--protocol official] [--device cuda]`
(the command line lives in freeseg/bench.py, with the other benchmarks).

infer: `inference.predict` of the full-size model (COCO preset, random weights, ViT-B/16-shaped
CLIP) on one random 640x480 image with 133 classes, all three tasks, under `--protocol`. Modes
(`--modes`): "previous" (`straightforward_predict`: task by task, every crop encoded), "exact"
(predict) and "fast" (predict in fast mode, freeseg/fast_inference.py), run interleaved
`--repeat` times after the text features are cached. Prints the median seconds of each stage (`StageTimer`: forward hooks
and wrappers around inference.py's building blocks; predict carries no timing code), the text
features' cold time, the crops CLIP encoded, peak memory, images per second, the speed-up over
"previous", and whether each mode's outputs equal the previous path's; then region CLIP's
seconds and GFLOP/s per crop against the machine's float32 matrix-product rate (the floor of any
float32 CLIP pass), and CLIP on 16 crops in float32 and under bfloat16 autocast (fast mode's
`clip_bfloat16`). docs/speed.md has the numbers and what the modes do.
"""

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from freeseg.bench import median_seconds


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
