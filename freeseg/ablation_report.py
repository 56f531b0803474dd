"""docs/ablations.md from the stored results of `python -m freeseg.ablations`.

Everything in the report is read from the run directory: each run's results.json (the rows it
was scored on), timings.jsonl and invocations.jsonl, so `--report-only` rebuilds the same file
from the same runs. For each row, the mean and standard deviation over seeds of each metric;
for each of the paper's five claims, the differences that test it and a verdict by the rule
of `verdict` (stated in the report too).
"""

import json
import math
import statistics
from pathlib import Path

from scipy.stats import t as student_t

from freeseg.ablations import BY_NAME, FULL_ROWS, MAIN_ROW, VARIANTS
from freeseg.data.io import atomic_write

METRICS = (  # (task, results key, column)
    ("semantic", "mIoU", "mIoU"), ("semantic", "mIoU_seen", "mIoU seen"), ("semantic", "mIoU_unseen", "mIoU unseen"),
    ("semantic", "hIoU", "hIoU"), ("panoptic", "PQ", "PQ"), ("panoptic", "PQ_seen", "PQ seen"),
    ("panoptic", "PQ_unseen", "PQ unseen"), ("instance", "AP", "AP"), ("instance", "AP_seen", "AP seen"),
    ("instance", "AP_unseen", "AP unseen"),
)
LABEL = {(task, key): column for task, key, column in METRICS}
FULL = ("full", MAIN_ROW)
MASK_ONLY, TTPT = ("full", FULL_ROWS[0]), ("full", FULL_ROWS[2])
# The table's rows: (variant, evaluation row) and the paper's direction beside it.
ROWS = (
    (MASK_ONLY, "(4) unseen far below full FreeSeg"),
    (FULL, "the reference: all three tasks, learned task + class prompts, interaction, CLIP ensemble"),
    (TTPT, "(5) unseen above full FreeSeg"),
    (("semantic_only", MAIN_ROW), "(1) not above full FreeSeg (hIoU)"),
    (("instance_only", MAIN_ROW), "(1) not above full FreeSeg (AP)"),
    (("panoptic_only", MAIN_ROW), "(1) not above full FreeSeg (PQ)"),
    (("no_task_prompt", MAIN_ROW), "(2) below full FreeSeg"),
    (("template", MAIN_ROW), "(2) below full FreeSeg"),
    (("no_interaction", MAIN_ROW), "(3) below full FreeSeg"),
)
HEADLINE = (("semantic", "hIoU"), ("panoptic", "PQ"), ("instance", "AP"))
UNSEEN = (("semantic", "mIoU_unseen"), ("panoptic", "PQ_unseen"), ("instance", "AP_unseen"))
# The claims as issue 28 words them, and the comparisons that test each: (paper's better row,
# other row, metric). Rows of one model (claims 4, 5) are compared seed by seed.
CLAIMS = (
    ("one model trained for all three tasks is as good as three task-specific models",
     [(FULL, ("semantic_only", MAIN_ROW), ("semantic", "hIoU")),
      (FULL, ("instance_only", MAIN_ROW), ("instance", "AP")),
      (FULL, ("panoptic_only", MAIN_ROW), ("panoptic", "PQ"))]),
    ("adaptive task and class prompts beat fixed templates",
     [(FULL, (v, MAIN_ROW), m) for v in ("template", "no_task_prompt") for m in HEADLINE]),
    ("semantic context interaction helps", [(FULL, ("no_interaction", MAIN_ROW), m) for m in HEADLINE]),
    ("the CLIP ensemble carries open-vocabulary transfer to unseen classes", [(FULL, MASK_ONLY, m) for m in UNSEEN]),
    ("test-time prompt tuning helps unseen classes", [(TTPT, FULL, m) for m in UNSEEN]),
)
MARGIN = 1.0  # claim 1: points the all-task model may lose and still count as "as good as"


def row_label(key: tuple[str, str], short: bool = False) -> str:
    variant, row = key
    if variant == "full":
        names = {MAIN_ROW: "full FreeSeg", FULL_ROWS[0]: "mask classifier only", FULL_ROWS[2]: "+ TTPT"} if short else \
            {MAIN_ROW: "full FreeSeg (+ CLIP ensemble)", FULL_ROWS[0]: "full FreeSeg, mask classifier only",
             FULL_ROWS[2]: "full FreeSeg + test-time prompt tuning (TTPT)"}
        return names[row]
    return BY_NAME[variant].label


def collect(run: Path, seeds: list[int]) -> tuple[dict, list[dict]]:
    """-> ({(variant, row): {seed: results_json dict}}, the stored results files read)."""
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    stored = []
    for v in VARIANTS:
        for seed in seeds:
            path = run / "ablations" / v.name / f"seed{seed}" / "results.json"
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            stored.append(data)
            for name, results in data["rows"].items():
                rows.setdefault((v.name, name), {})[seed] = results
    return rows, stored


def values(rows: dict, key: tuple[str, str], metric: tuple[str, str]) -> dict[int, float]:
    task, name = metric
    found = {seed: r.get(task, {}).get(name) for seed, r in rows.get(key, {}).items()}
    return {seed: v for seed, v in found.items() if v is not None}


def cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def difference(a: dict[int, float], b: dict[int, float], paired: bool) -> tuple[float, float] | None:
    """Mean difference a - b and the half-width of its 95% t-interval (Welch's for two sets of
    models; over per-seed differences for two rows of the same models). None below 2 seeds."""
    if paired:
        diffs = [a[s] - b[s] for s in a if s in b]
        if len(diffs) < 2:
            return None
        se, df = statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs) - 1
        d = statistics.mean(diffs)
    else:
        if len(a) < 2 or len(b) < 2:
            return None
        va, vb = statistics.variance(a.values()) / len(a), statistics.variance(b.values()) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1
        d = statistics.mean(a.values()) - statistics.mean(b.values())
    return d, (student_t.ppf(0.975, df) * se if se > 0 else 0.0)


def verdict(d: float, half: float, equivalence: bool) -> str:
    """"agrees" when the 95% interval lies on the paper's side of 0 (claim 1, where the paper
    claims parity: above -MARGIN), "disagrees" when it lies on the other side, else "cannot tell"."""
    if (d - half > -MARGIN) if equivalence else (d - half > 0):
        return "agrees"
    if d + half < 0:
        return "disagrees"
    return "cannot tell"


def claim_sentence(number: int, text: str, comparisons, rows: dict) -> str:
    parts, verdicts = [], []
    for better, other, metric in comparisons:
        paired = better[0] == other[0]  # two evaluation rows of the same checkpoints
        found = difference(values(rows, better, metric), values(rows, other, metric), paired)
        what = f"{LABEL[metric]}, {row_label(better, True)} - {row_label(other, True)}"
        if found is None:
            verdicts.append("cannot tell")
            parts.append(f"{what}: fewer than 2 seeds")
            continue
        d, half = found
        verdicts.append(verdict(d, half, equivalence=number == 1))
        parts.append(f"{what}: {d:+.1f} ± {half:.1f} ({verdicts[-1]})")
    if "agrees" in verdicts and "disagrees" in verdicts:
        overall = "mixed"
    elif set(verdicts) == {"agrees"}:
        overall = "agrees"
    elif set(verdicts) == {"disagrees"}:
        overall = "disagrees"
    elif "agrees" in verdicts or "disagrees" in verdicts:
        overall = ("agrees" if "agrees" in verdicts else "disagrees") + " on some metrics, cannot tell on the others"
    else:
        overall = "cannot tell at this number of seeds"
    return f"{number}. *{text}*: **{overall}**. " + "; ".join(parts) + "."


def recipe(stored: list[dict]) -> str:
    kinds = {(d["iteration"], d["max_images"], tuple(d.get("overrides", []))) for d in stored}
    lines = [f"{len(stored)} runs: all-task stage of {it} iterations, evaluated on "
             f"{'all' if n is None else f'the first {n}'} toy val images"
             + (f", overrides {' '.join(o)}" if o else "") for it, n, o in sorted(kinds, key=str)]
    if len(kinds) > 1:
        lines.append("**The runs were made with different recipes: the table mixes them.**")
    return "; ".join(lines) if lines else "no stored runs"


def timing(run: Path) -> list[str]:
    lines = []
    path = run / "ablations" / "timings.jsonl"
    if path.exists():
        by_kind: dict[str, list[float]] = {}
        for rec in map(json.loads, path.read_text().splitlines()):
            total = by_kind.setdefault(rec["kind"], [0.0, 0])
            total[0] += rec["seconds"]
            total[1] += 1
        parts = [f"{kind} {s / 60:.1f} min ({n} steps)" for kind, (s, n) in by_kind.items()]
        lines.append(f"Measured time of every step run: {sum(s for s, _ in by_kind.values()) / 60:.1f} min "
                     f"({', '.join(parts)}).")
    path = run / "ablations" / "invocations.jsonl"
    if path.exists():
        runs = [rec for rec in map(json.loads, path.read_text().splitlines()) if rec["steps"]]
        if runs:
            lines.append("Invocations that ran steps (wall time, processes, steps): " + "; ".join(
                f"{r['started']}: {r['wall_s'] / 60:.1f} min, {r['world_size']}, {r['steps']}" for r in runs) + ".")
    return lines


def render(run: Path, seeds: list[int]) -> str:
    rows, stored = collect(run, seeds)
    seed_text = " ".join(map(str, seeds))
    out = [
        "# FreeSeg's ablations in the miniature world",
        "",
        f"Generated by `python -m freeseg.ablations --dataset toy --seeds {seed_text}` (or under `torchrun "
        f"--standalone --nproc_per_node=2 -m ...`) from the results stored under `{run}/ablations/`; "
        f"`python -m freeseg.ablations --report-only --output-dir {run} --seeds {seed_text}` rebuilds it. "
        "Each variant changes one thing of the toy preset and starts from the toy pipeline's tiny CLIP, backbone "
        "and prompts; the seed is the all-task stage's (`train.seed`). Scores in percent on toy val, over all 35 "
        "classes at once (28 seen, 7 unseen); mean ± standard deviation over the seeds present (column n). "
        "Single-task models are scored on their own task only.",
        "",
        f"Recipe: {recipe(stored)}.",
        "",
        "| variant | paper's direction | n | " + " | ".join(col for _, _, col in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for key, paper in ROWS:
        n = len(rows.get(key, {}))
        cells = [cell(list(values(rows, key, (task, name)).values())) for task, name, _ in METRICS]
        out.append(f"| {row_label(key)} | {paper} | {n} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## The paper's claims",
        "",
        "Each claim is tested by differences of means in the paper's direction (positive: as the paper says), "
        "given as d ± h, h the half-width of its 95% t-interval: Welch's interval over the seeds of two sets of "
        "models, or the interval of the per-seed differences for two rows of the same models (claims 4 and 5). "
        "A difference *agrees* when the whole interval lies on the paper's side of 0, *disagrees* when it lies "
        f"on the other side, and *cannot tell* otherwise or with fewer than 2 seeds. Claim 1 claims parity: "
        f"there the all-task model agrees when the interval lies above -{MARGIN:g} point (at most {MARGIN:g} point "
        "worse, or better) and disagrees when it lies below 0 without that. A claim agrees (disagrees) when every "
        "difference does, and is mixed when some agree and some disagree.",
        "",
    ]
    out += [claim_sentence(i + 1, text, comps, rows) for i, (text, comps) in enumerate(CLAIMS)]
    out += ["", "## Per seed", "", "| variant | seed | " + " | ".join(col for _, _, col in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS)]
    for key, _ in ROWS:
        for seed in sorted(rows.get(key, {})):
            cells = [_value(rows[key][seed], task, name) for task, name, _ in METRICS]
            out.append(f"| {row_label(key)} | {seed} | " + " | ".join(cells) + " |")
    time_lines = timing(run)
    if time_lines:
        out += ["", "## Time", ""] + time_lines
    return "\n".join(out) + "\n"


def _value(results: dict, task: str, name: str) -> str:
    v = results.get(task, {}).get(name)
    return "-" if v is None else f"{v:.1f}"


def write_report(run: Path, path: Path, seeds: list[int]) -> str:
    """Render the report from the runs under `run` and write it to `path` atomically."""
    text = render(run, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(str(path), "w") as f:
        f.write(text)
    print(f"[ablations] table of {len(collect(run, seeds)[1])} runs written to {path}", flush=True)
    return text
