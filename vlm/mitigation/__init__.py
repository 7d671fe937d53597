"""Decode-time hallucination mitigation, switched on per `generate` call:

    model.generate(**inputs, mitigation=["vhr"], max_new_tokens=64)
    model.generate(**inputs, mitigation={"pai": {"alpha": 0.2}, "vcd": {"alpha": 1.0}})
    model.generate(**inputs, mitigation="vhr,pai:alpha=0.2")

    model.generate(**inputs, mitigation="icd", processor=processor)  # ICD and LQCD rewrite the prompt with it

One file per method (see docs/mitigation.md), each registering itself in `registry.py`: `vhr.py` (head
reinforcement), `pai.py`, `paint.py`, `var.py` (attention edits through the registered attention function of
`attention.py`), `vcd.py`, `icd.py`, `lqcd.py` (contrastive decoding with the second cached branch of
`contrastive.py`); `generation.py` runs them; statistics saved with a model in `calibration.py`, measured from
the command line by `python -m vlm.mitigation` (`__main__.py`).
"""

from .calibration import (STATS_FILE, calibrate_mitigation_stats, load_mitigation_stats, model_mitigation_stats,
                          save_mitigation_stats)
from .generation import generate_with_mitigation, mitigated_generate
from .registry import METHODS, check_supported
from .spec import (METHOD_DEFAULTS, check_options, default_layers, normalize_spec, parse_mitigation_arg,
                   resolve_mitigation)

__all__ = [
    "METHODS", "METHOD_DEFAULTS", "STATS_FILE", "calibrate_mitigation_stats", "check_options", "check_supported", "default_layers",
    "generate_with_mitigation", "load_mitigation_stats",
    "mitigated_generate", "model_mitigation_stats", "normalize_spec", "parse_mitigation_arg", "resolve_mitigation",
    "save_mitigation_stats",
]
