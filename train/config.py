"""Training configuration: one YAML file per recipe, loaded into dataclasses.

    config = load_config("demo_tiny", ["optim.lr=1e-3", "max_steps=50"])
    save_config(config, "run/config.yaml")

Every YAML key must name a dataclass field; values are type-checked against the field's annotation, and
`key=value` overrides use dotted keys (`optim.lr=1e-3`, `data.sources.0.weight=2`). Errors name the file
and the key. `add_arguments` and `config_from_args` are the command-line form, shared by `vlm train` and
`python -m train.finetune`.
"""

import argparse
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.typed_yaml import ConfigError, from_mapping, read_mapping
from vlm.cli import did_you_mean

STAGES = ("align", "finetune", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
DATA_KINDS = ("scenes", "scene_captions", "easyvqa", "llava", "coco")


# `VLMConfig` arguments that training sets itself: the image token from the tokenizer, the LLM path from
# `model.llm`, the tower's width and token count from the built tower.
SET_BY_TRAINING = ("image_token_id", "text_pretrained_path", "vision_hidden_size", "vision_num_tokens")


def vlm_options() -> list[str]:
    """The keys `model.vlm` may hold: `VLMConfig`'s arguments (less `SET_BY_TRAINING`) and the LLM's
    `attn_implementation`."""
    from vlm.config import VLMConfig

    parameters = inspect.signature(VLMConfig.__init__).parameters
    return [name for name, parameter in parameters.items() if name != "self" and parameter.kind is
            inspect.Parameter.POSITIONAL_OR_KEYWORD and name not in SET_BY_TRAINING] + ["attn_implementation"]


@dataclass
class ModelSpec:
    """Which model to train: `init_from` (a saved `VisionLanguageModel` folder, e.g. the output of an `align`
    run), or a new model from `vlm`, the arguments of `vlm.VLMConfig` as they are (`vision`, `vision_kwargs`,
    `connector`, `attention_mode`, `freeze_vision`, ...; `text_config`, a config dict with `model_type`, for an
    LLM from scratch), with `llm` (a pretrained Hugging Face causal-LM folder, e.g. `vlm assets smollm2 --out DIR`)
    for a pretrained LLM. The other fields are what training adds."""

    init_from: str | None = None
    vlm: dict = field(default_factory=dict)
    llm: str | None = None
    # Tokenizer folder; default: the LLM's own. A from-scratch model trains a byte-level BPE of this size
    # on the training texts (saved with the run, so a resumed run uses the same vocabulary).
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 512
    gradient_checkpointing: bool = False
    # the prompt conventions of the training data, saved with the processor as `vlm eval`'s defaults
    # (keys pope_suffix, chair, captions, vqa_suffix; e.g. {vqa_suffix: ""} when questions carry no suffix)
    prompts: dict = field(default_factory=dict)


@dataclass
class DataSource:
    """One dataset of the training mix.

    `kind`: `scenes` (`path` = a folder written by `vlm data scenes`, its LLaVA conversations of `split`),
    `scene_captions` (the same folder's COCO captions of `split`, as one-caption samples),
    `easyvqa` (the easy-vqa package, `split` train/test), `llava` (`path` = a LLaVA JSON file, images under
    `image_root`), `coco` (`path` = a COCO captions or Karpathy JSON file, images under `image_root`).
    `weight` scales how often its samples appear per epoch (2.0 = every sample twice, 0.5 = a seeded
    half). `limit` keeps the first N samples. `options` go to the dataset class."""

    kind: str
    path: str | None = None
    image_root: str | None = None
    split: str = "train"
    weight: float = 1.0
    limit: int | None = None
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    num_workers: int = 0
    # Samples longer than this are cut from the end (answers first); None = the LLM's context length.
    max_length: int | None = None
    # Batches of samples with similar text lengths (less padding, faster steps); the order stays seeded.
    group_by_length: bool = False
    # Each batch cut into this many micro-batches of samples of similar length: the same samples and gradient
    # as one batch, less padding.
    split_by_length: int = 1


@dataclass
class StageSpec:
    """`align`: connector only. `finetune`: connector + LoRA on the LLM (or the whole LLM with
    `lora: false`), plus the vision tower with `train_vision`. `full`: everything."""

    name: str = "finetune"
    lora: bool = True
    train_vision: bool = False


@dataclass
class LoRASpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" = every linear layer of the LLM except its output head.
    target_modules: str | list[str] = "all-linear"


@dataclass
class OptimSpec:
    """AdamW. `lr` is the default; `vision_lr` / `connector_lr` / `llm_lr` override it per module."""

    lr: float = 1e-4
    vision_lr: float | None = None
    connector_lr: float | None = None
    llm_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


@dataclass
class ScheduleSpec:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointSpec:
    save_every: int = 0  # optimizer steps between checkpoints; 0 = none
    keep_last: int = 2


@dataclass
class LoggingSpec:
    """`progress`: a tqdm bar on a terminal; off a terminal, or with `progress: false`, a line (step, loss, rate,
    ETA) every `progress_every_s` seconds on stderr and in `out_dir/train.log`. `library_progress` keeps the
    bars of transformers and huggingface_hub (weight saving) that are otherwise off during training."""

    log_every: int = 1
    progress: bool = True
    progress_every_s: float = 30.0
    library_progress: bool = False
    tensorboard: bool = False
    plot: bool = True


@dataclass
class TrainConfig:
    """A whole training run. `batch_size` is per process; the global batch of one optimizer step is
    `batch_size * num_processes * grad_accum`."""

    out_dir: str = "runs/train"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageSpec = field(default_factory=StageSpec)
    lora: LoRASpec = field(default_factory=LoRASpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    resume: bool = False

    def validate(self, check_data: bool = True) -> "TrainConfig":
        """Check values that the type annotations cannot express; returns self. `check_data=False` allows an
        empty `data.sources` (datasets handed to `train.finetune.train` directly)."""
        choices = {"stage.name": (self.stage.name, STAGES), "precision": (self.precision, PRECISIONS),
                   "schedule.name": (self.schedule.name, SCHEDULES)}
        for index, source in enumerate(self.data.sources):
            choices[f"data.sources.{index}.kind"] = (source.kind, DATA_KINDS)
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {allowed}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_steps": self.max_steps,
                    "logging.log_every": self.logging.log_every, "checkpoint.keep_last": self.checkpoint.keep_last}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if not 1 <= self.data.split_by_length <= self.batch_size:
            raise ConfigError(f"data.split_by_length must be between 1 and batch_size ({self.batch_size}), got "
                              f"{self.data.split_by_length}")
        options = vlm_options()
        for name in self.model.vlm:
            if name not in options:
                raise ConfigError(f"unknown key 'model.vlm.{name}' ({did_you_mean(name, options)}VLMConfig's "
                                  f"arguments: {', '.join(options)})")
        text_config = self.model.vlm.get("text_config")
        if self.model.init_from is None and self.model.llm is None and text_config is None:
            raise ConfigError("model: give init_from (a VLM folder), llm (an LLM folder) or vlm.text_config "
                              "(from scratch)")
        if self.model.llm is not None and text_config is not None:
            raise ConfigError("model: give either llm or vlm.text_config, not both")
        if check_data and not self.data.sources:
            raise ConfigError("data.sources is empty: list at least one dataset")
        return self


def config_from_dict(values: dict) -> TrainConfig:
    """A validated `TrainConfig` from nested plain values (as read from YAML)."""
    return from_mapping(TrainConfig, values or {}).validate()


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------- overrides
def apply_override(values: dict, override: str) -> dict:
    """Set `a.b.c=value` in the nested dict `values` (value parsed as YAML; list items by index)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: cannot parse {text!r}: {error}") from None
    parts = key.split(".")
    node = values
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {where!r} is not an index of a {len(node)}-item list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {where!r} holds a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: {last!r} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value
    return values


RECIPES_DIR = Path(__file__).parent / "configs"


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_list() -> list[tuple[str, str]]:
    """`vlm list recipes`: each shipped recipe with its header's first sentence and its main settings."""
    rows = []
    for name in shipped_recipes():
        path = RECIPES_DIR / f"{name}.yaml"
        header = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines()
                          if line.startswith("#"))
        config = load_config(path)
        lora = config.stage.lora and config.stage.name == "finetune"  # the other stages ignore it
        settings = f"stage={config.stage.name}{' (LoRA)' if lora else ''}, max_steps={config.max_steps}, " \
                   f"batch_size={config.batch_size}"
        rows.append((name, f"{header.split('. ')[0].rstrip('.')}; {settings}"))
    return rows


def resolve_recipe(name_or_path) -> Path:
    """A recipe file, or the name of a shipped one (`demo_tiny` -> train/configs/demo_tiny.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and (RECIPES_DIR / f"{path.name}.yaml").is_file() and len(path.parts) == 1:
        return RECIPES_DIR / f"{path.name}.yaml"
    raise ConfigError(f"{name_or_path}: no such recipe file, nor a shipped recipe ({', '.join(shipped_recipes())})")


def load_config(path=None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a recipe YAML (a path or a shipped recipe's name; the defaults when `path` is None) and apply
    `key=value` overrides.

    The defaults are filled in first so overrides can reach into nested sections and list items."""
    values = config_to_dict(TrainConfig())
    values["data"]["sources"] = []
    if path is not None:
        path = resolve_recipe(path)
        loaded = read_mapping(path)
        try:
            values = config_to_dict(from_mapping(TrainConfig, loaded))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    for override in overrides:
        apply_override(values, override)
    try:
        return config_from_dict(values)
    except ConfigError as error:
        where = f"{path} (with {len(overrides)} overrides)" if overrides else str(path)
        raise ConfigError(f"{where}: {error}") from None


def save_config(config: TrainConfig, path) -> Path:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True,
                        help="recipe YAML, or the name of a shipped recipe (demo_tiny, smollm2_lora_scenes, ...)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")


def config_from_args(args) -> TrainConfig:
    """The `TrainConfig` named by parsed `add_arguments` arguments."""
    config = load_config(args.config, args.overrides)
    if args.resume:
        config.resume = True
    return config
