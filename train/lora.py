"""LoRA on the LLM of a `VisionLanguageModel`: add, save, load and merge adapters.

An adapter folder holds
- `adapter_config.json` + `adapter_model.safetensors`: the peft LoRA adapter of the LLM;
- `non_lora_trainables.safetensors`: the other weights the run trained (connector, and the vision tower
  when it was trained), named as in the VLM's state dict.
It applies on top of the base model the run started from (`base/` in the run folder, or the `init_from`
folder of the recipe). The one call to make a plain model out of it:

    merge_adapter("runs/x/base", "runs/x/adapter", "runs/x/merged")   # loadable with VisionLanguageModel.from_pretrained
"""

from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import LoRASpec

NON_LORA_FILE = "non_lora_trainables.safetensors"


def has_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def add_lora(model, spec: LoRASpec):
    """Wrap `model.language_model` in LoRA adapters (in place); only the adapters are trainable in it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, config)
    return model


def save_adapter(model, folder) -> Path:
    """Write the LLM's LoRA adapter and the other trainable weights of `model` to `folder`."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter to save (train with stage.name=finetune, stage.lora=true)")
    folder = Path(folder)
    # The embeddings are frozen (only resized for <image>): the base model holds them, so the adapter
    # stays small instead of peft copying the whole vocabulary matrix in.
    model.language_model.save_pretrained(folder, save_embedding_layers=False)
    others = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and not name.startswith("language_model.")
    }
    save_file(others, str(folder / NON_LORA_FILE))
    return folder


def load_adapter(model, folder):
    """Put the adapter saved in `folder` on `model` (a base `VisionLanguageModel`) in place; returns it."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}/adapter_config.json is missing: is {folder} an adapter folder written by save_adapter?")
    model.language_model = PeftModel.from_pretrained(model.language_model, folder)
    others_file = folder / NON_LORA_FILE
    if others_file.is_file():
        others = load_file(str(others_file))
        unknown = set(others) - set(model.state_dict())
        if unknown:
            raise ValueError(f"{others_file}: weights {sorted(unknown)[:3]} do not exist in this model: wrong base model?")
        model.load_state_dict(others, strict=False)
    return model


def merge_lora(model):
    """Fold the LoRA adapter into the LLM weights (in place): the result is a plain `VisionLanguageModel`."""
    if has_lora(model):
        model.language_model = model.language_model.merge_and_unload()
    return model


def merge_adapter(model_dir, adapter_dir, out_dir) -> Path:
    """Load the base model in `model_dir`, apply the adapter in `adapter_dir`, merge it, and save a plain
    `save_pretrained` folder (with the processor, when `model_dir` has one) to `out_dir`."""
    from vlm import VisionLanguageModel
    from vlm.processing import PROCESSOR_FILE, VLMProcessor

    model = VisionLanguageModel.from_pretrained(model_dir)
    merge_lora(load_adapter(model, adapter_dir))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if (Path(model_dir) / PROCESSOR_FILE).is_file():
        VLMProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir

