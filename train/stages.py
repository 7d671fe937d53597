"""Training stages: which parts of a `VisionLanguageModel` learn, and at which learning rate.

- `align`: the connector only (LLaVA's pre-training / prismatic's "align").
- `finetune`: the connector + the LLM, through LoRA adapters by default (`stage.lora`), plus the vision
  tower when `stage.train_vision`.
- `full`: every parameter.
"""

from collections import defaultdict

from .config import OptimSpec, StageSpec, LoRASpec
from .lora import add_lora

MODULES = ("vision_tower", "connector", "language_model")


def apply_stage(model, stage: StageSpec, lora: LoRASpec):
    """Freeze / unfreeze `model` in place for `stage` (adding LoRA adapters to the LLM when asked).

    Frozen towers are put in eval mode by `set_train_mode`, so their dropout and norm statistics stay put."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if stage.name == "full":
        model.requires_grad_(True)
    elif stage.name == "finetune":
        if stage.lora:
            add_lora(model, lora)  # peft marks only the adapter weights trainable
        else:
            model.language_model.requires_grad_(True)
        if stage.train_vision:
            model.vision_tower.requires_grad_(True)
    return model


def set_train_mode(model):
    """`model.train()`, except sub-modules without any trainable parameter, which stay in eval mode."""
    model.train()
    for name in MODULES:
        module = getattr(model, name)
        if not any(param.requires_grad for param in module.parameters()):
            module.eval()
    return model


def module_of(parameter_name: str) -> str:
    """'vision_tower' / 'connector' / 'language_model' for a parameter name of the (unwrapped) model."""
    head = parameter_name.split(".", 1)[0]
    if head not in MODULES:
        raise ValueError(f"parameter {parameter_name!r} belongs to none of {MODULES}")
    return head


def parameter_groups(model, optim: OptimSpec) -> list[dict]:
    """AdamW parameter groups: one per (module, decay) pair holding trainable parameters. Each module takes
    its own learning rate (`vision_lr`, `connector_lr`, `llm_lr`, else `lr`); biases and norm weights
    (1-D tensors) get no weight decay."""
    module_lr = {"vision_tower": optim.vision_lr, "connector": optim.connector_lr, "language_model": optim.llm_lr}
    groups = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(module_of(name), param.ndim >= 2)].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter for this stage")
    return [
        {"params": params, "lr": module_lr[module] if module_lr[module] is not None else optim.lr,
         "weight_decay": optim.weight_decay if decay else 0.0, "name": f"{module}{'' if decay else '.no_decay'}"}
        for (module, decay), params in sorted(groups.items())
    ]
