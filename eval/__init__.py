"""Evaluation of vision-language models.

Metrics, plain functions over answers or captions already generated (no model needed): POPE (:mod:`eval.pope`),
CHAIR (:mod:`eval.chair`), COCO caption metrics (:mod:`eval.caption_metrics`, pycocoevalcap + Java), VQA
accuracy (:mod:`eval.vqa`) and report figures (:mod:`eval.plots`). Running a model: batched generation
(:mod:`eval.inference`), the resumable runner (:mod:`eval.runner`), inputs (:mod:`eval.sources`), the tasks
(:mod:`eval.tasks`), reports (:mod:`eval.report`), attention maps (:mod:`eval.attention_map`) and the command
line (:mod:`eval.cli`). Submodules are imported on demand.
"""
