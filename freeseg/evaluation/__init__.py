"""Metrics: semantic mIoU / hIoU, panoptic PQ, instance mask AP, and the results report."""

from freeseg.evaluation.instance import InstanceEvaluator
from freeseg.evaluation.panoptic import PanopticEvaluator
from freeseg.evaluation.report import format_table, results_json, write_results
from freeseg.evaluation.semantic import SemanticEvaluator, harmonic_mean

__all__ = ["SemanticEvaluator", "PanopticEvaluator", "InstanceEvaluator", "harmonic_mean",
           "results_json", "format_table", "write_results"]
