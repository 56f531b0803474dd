"""Results JSON of docs/design.md ("Results file") and the printed table."""

import json
import math

import pytest

from freeseg.evaluation import format_table, results_json, write_results

SEMANTIC = {"mIoU": 40.0, "mIoU_seen": 45.0, "mIoU_unseen": 30.0, "hIoU": 36.0, "pAcc": 70.0,
            "IoU": [40.0, 40.0]}
INSTANCE = {"AP": 20.0, "AP50": 35.5, "AP75": 18.0, "AP_seen": 22.0, "AP_unseen": math.nan}


def test_results_json_has_only_evaluated_tasks_and_scalars(tmp_path):
    results = results_json(semantic=SEMANTIC, instance=INSTANCE)
    assert list(results) == ["semantic", "instance"]
    assert list(results["semantic"]) == ["mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"]
    assert list(results["instance"]) == ["AP", "AP50", "AP_seen", "AP_unseen", "AP75"]
    path = tmp_path / "results.json"
    write_results(path, results)
    written = json.loads(path.read_text())
    assert written["instance"]["AP_unseen"] is None  # NaN -> null: strict JSON
    assert written["semantic"]["hIoU"] == 36.0


def test_results_json_rejects_incomplete_summary():
    with pytest.raises(KeyError, match="panoptic summary lacks"):
        results_json(panoptic={"PQ": 1.0})


def test_format_table():
    lines = format_table(results_json(semantic=SEMANTIC, instance=INSTANCE)).splitlines()
    assert lines[0].split() == ["semantic", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"]
    assert lines[1].split() == ["40.0", "45.0", "30.0", "36.0", "70.0"]
    assert lines[3].split() == ["20.0", "35.5", "22.0", "-", "18.0"]
    assert len({len(line) for line in lines}) <= 2  # each task's header and values aligned
    assert len(lines[0]) == len(lines[1]) and len(lines[2]) == len(lines[3])


def test_format_table_with_named_rows():
    rows = {"mask classifier only": results_json(semantic=SEMANTIC),
            "+ CLIP ensemble": results_json(semantic=dict(SEMANTIC, mIoU=45.25))}
    lines = format_table(rows).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[1].startswith("mask classifier only  ") and lines[1].split()[3] == "40.0"
    assert lines[2].startswith("+ CLIP ensemble") and lines[2].split()[3] == "45.2"
