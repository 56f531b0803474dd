"""Evaluation report: the results JSON of docs/design.md ("Results file") and a printed table.

`results_json` keeps the scalar metrics of each evaluated task (per-class lists are dropped)
and checks that the keys the public interface promises are there; `write_results` writes it
atomically with NaN (a metric that could not be computed, e.g. no unseen class) as null, so
the file is strict JSON.
"""

import math
import os

from freeseg.distributed import atomic_write_json

# Keys promised by docs/design.md ("Results file"); evaluators may add more (PQ_th, AP75, ...).
REQUIRED_KEYS = {
    "semantic": ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"),
    "panoptic": ("PQ", "SQ", "RQ", "PQ_seen", "PQ_unseen"),
    "instance": ("AP", "AP50", "AP_seen", "AP_unseen"),
}


def results_json(semantic: dict | None = None, panoptic: dict | None = None,
                 instance: dict | None = None) -> dict:
    """{"semantic": {...}, "panoptic": {...}, "instance": {...}} for the tasks given (percent).

    Each argument is an evaluator's `summary()`; required keys come first, in the documented order.
    """
    results = {}
    for task, summary in (("semantic", semantic), ("panoptic", panoptic), ("instance", instance)):
        if summary is None:
            continue
        missing = [k for k in REQUIRED_KEYS[task] if k not in summary]
        if missing:
            raise KeyError(f"results_json: {task} summary lacks {missing}")
        ordered = list(REQUIRED_KEYS[task]) + [k for k in summary if k not in REQUIRED_KEYS[task]]
        results[task] = {k: float(summary[k]) for k in ordered
                         if isinstance(summary[k], (int, float))}
    return results


def _json_safe(results: dict) -> dict:
    return {task: {k: None if math.isnan(v) else v for k, v in metrics.items()}
            for task, metrics in results.items()}


def write_results(path: str | os.PathLike, results: dict) -> None:
    """Write `results_json(...)` output to `path` atomically (NaN becomes null)."""
    atomic_write_json(_json_safe(results), path)


def format_table(results: dict, digits: int = 1) -> str:
    """Plain aligned text: per task a header of metric names, then one row of values per run.

    `results` is one `results_json(...)` dict, or {row name: results_json dict} to compare runs
    (e.g. the ablation rows of evaluate.py). NaN / None prints as "-":

        semantic           mIoU  mIoU_seen  mIoU_unseen  hIoU  pAcc
        + CLIP ensemble    41.2       43.0         30.1  35.4  70.3
    """
    is_single = all(not isinstance(v, dict) for m in results.values() for v in m.values())
    rows = {"": results} if is_single else results
    label_width = max([len(name) for name in rows] + [len(t) for r in rows.values() for t in r])
    lines = []
    for task in dict.fromkeys(t for r in rows.values() for t in r):  # tasks in first-seen order
        names = list(dict.fromkeys(k for r in rows.values() for k in r.get(task, {})))
        cells = {row: [_cell(r.get(task, {}).get(k), digits) for k in names]
                 for row, r in rows.items()}
        widths = [max([len(n)] + [len(c[i]) for c in cells.values()]) for i, n in enumerate(names)]
        for label, texts in [(task, names)] + list(cells.items()):
            lines.append("  ".join([label.ljust(label_width)]
                                   + [t.rjust(w) for t, w in zip(texts, widths)]))
    return "\n".join(lines)


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
