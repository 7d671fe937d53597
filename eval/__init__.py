"""Evaluation: POPE (:mod:`eval.pope`), CHAIR (:mod:`eval.chair`), COCO caption metrics
(:mod:`eval.caption_metrics`), VQA accuracy (:mod:`eval.vqa`) and report figures (:mod:`eval.plots`).

The metric modules are plain functions over answers/captions already generated, so they run without a model;
submodules are imported on demand (caption metrics pull in pycocoevalcap, plots pull in matplotlib).
"""
