"""Every instruction the suite writes into data or asks a model, in one place.

The evaluation defaults follow the literature, so that numbers compare with published ones; a model trained here
carries the conventions of its own training data in its processor (`VLMProcessor.prompts`), and `vlm eval` uses
those first.
"""

# The synthetic scenes' long-description question; also what the mitigation heads are calibrated on.
DETAIL_PROMPT = "Describe the image in detail."
# `vlm caption` and the default instruction of COCO caption training samples.
SHORT_CAPTION_PROMPT = "Describe the image."
# CHAIR's instruction in OPERA, VCD and lmms-eval.
CHAIR_PROMPT = "Please describe this image in detail."
# lmms-eval's COCO captions instruction; the scenes' caption samples use it too.
COCO_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
# LLaVA-1.5's short-answer VQA suffix.
VQA_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
