"""The Python examples of README.md and docs/*.md run exactly as written (in a fresh working folder)."""

import re

import pytest

from test_train_helpers import REPO


def python_blocks(path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    blocks = python_blocks(REPO / "README.md")
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "my-vlm" / "config.json").is_file()


# What each file's blocks leave behind in the working folder (cheap evidence that they did their work).
DOC_OUTPUTS = {
    "docs/backbones.md": ["official_checkpoint.pth"],
    "docs/evaluation.md": ["my-vlm/config.json", "out/pope_adversarial.answers.jsonl", "out/chair_64tok_summary.json"],
    "docs/mitigation.md": [],
    "docs/training.md": ["runs/demo/final/config.json", "runs/x/adapter/adapter_config.json",
                         "runs/x/merged/config.json"],
}


@pytest.mark.parametrize("doc", sorted(DOC_OUTPUTS))
def test_docs_python_snippets_run(doc, tmp_path, monkeypatch):
    """One file's blocks in order, in one namespace (later blocks use what earlier ones defined)."""
    blocks = python_blocks(REPO / doc)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, doc, "exec"), namespace)
    for output in DOC_OUTPUTS[doc]:
        assert (tmp_path / output).is_file(), output
    if doc == "docs/backbones.md":
        assert len(namespace["maps"]) == 4  # features_only: four feature maps
    if doc == "docs/evaluation.md":
        assert namespace["batch"][0]["file"] == "a.png" and "answer" in namespace["batch"][0]
        assert namespace["metrics"]["n_errors"] == 0 and namespace["chair"]["n_errors"] == 0
    if doc == "docs/mitigation.md":
        inputs = namespace["inputs"]
        assert namespace["output"].shape[1] > inputs["input_ids"].shape[1]  # the HF model generated
