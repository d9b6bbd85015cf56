"""Evaluation: panoptic quality, semantic IoU, COCO mask AP, and running a model over a dataset.

Import the submodules you need (``from maskformers.evaluation.panoptic_quality import PanopticQuality``);
nothing here is imported by ``import maskformers``.
"""
