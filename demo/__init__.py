"""The demo: the whole suite on the built-in synthetic scenes (`vlm demo`; see `demo.cli`).

`recipe` (scenes, backbones, the `demo_tiny` recipe with a run's overrides), `evaluate` (every metric and
mitigation head on the test split), `report` (report.md / report.html), `run` (one demo, or every backbone and
mode), `seeds` (mitigation effects against the seed-to-seed spread), `cli` (the command).
"""

from .run import run_demo

__all__ = ["run_demo"]
