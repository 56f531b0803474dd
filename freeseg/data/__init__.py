"""Datasets: category lists, raw-to-prepared conversion, dataset readers, augmentation, toy world.

Modules are imported directly (`from freeseg.data.datasets import SegmentationDataset`) so that
preparing data never imports torch models and vice versa.
"""
