"""Training configuration: one YAML file per recipe, loaded into dataclasses.

    config = load_config("demo_tiny", ["optim.lr=1e-3", "max_steps=50"])
    save_config(config, "run/config.yaml")

Every YAML key must name a dataclass field; values are type-checked against the field's annotation, and
`key=value` overrides use dotted keys (`optim.lr=1e-3`, `data.sources.0.weight=2`). Errors name the file
and the key.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlm.cli import did_you_mean

STAGES = ("align", "finetune", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
DATA_KINDS = ("scenes", "easyvqa", "llava", "coco")


class ConfigError(ValueError):
    """A recipe or override that does not fit the `TrainConfig` schema."""


@dataclass
class ModelSpec:
    """Which model to train. Either `init_from` (a `VisionLanguageModel` folder, e.g. the output of an
    `align` run), or a new model from `vision` + `connector` + an LLM: `llm` (a pretrained Hugging Face
    causal-LM folder, e.g. `vlm assets smollm2 --out DIR`) or `text_config` (a from-scratch config dict with
    `model_type`)."""

    init_from: str | None = None
    vision: str = "vit_tiny_patch16_224"
    vision_kwargs: dict = field(default_factory=dict)
    vision_pretrained_file: str | None = None
    vision_feature_layer: int = -1
    image_size: int | None = None  # the tower's input size; default: its img_size argument or timm's data config
    connector: str = "mlp2x_gelu"
    connector_kwargs: dict = field(default_factory=dict)
    llm: str | None = None
    text_config: dict | None = None
    attention_mode: str = "causal"
    attn_implementation: str = "sdpa"
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
        if self.model.init_from is None and self.model.llm is None and self.model.text_config is None:
            raise ConfigError("model: give init_from (a VLM folder), llm (an LLM folder) or text_config (from scratch)")
        if self.model.llm is not None and self.model.text_config is not None:
            raise ConfigError("model: give either llm or text_config, not both")
        if check_data and not self.data.sources:
            raise ConfigError("data.sources is empty: list at least one dataset")
        return self


# ------------------------------------------------------------------------------------------ conversion
def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value, annotation, key: str):
    """`value` checked (and, where lossless, converted) against the type `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(annotation)}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _from_dict(annotation, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (object,)
        return [_convert(item, item_type, f"{key}.{index}") for index, item in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        # YAML reads "1e-3" (no dot) as a string; ints are fine as floats
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is object:
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(annotation)}")


def _from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(f"unknown key {key!r} ({did_you_mean(name, known)}known keys{' under ' + prefix if prefix else ''}: "
                              f"{', '.join(sorted(known))})")
        kwargs[name] = _convert(value, hints[name], key)
    for item in dataclasses.fields(cls):
        if item.name not in kwargs and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix or cls.__name__}: the required key {item.name!r} is missing")
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    """A validated `TrainConfig` from nested plain values (as read from YAML)."""
    return _from_dict(TrainConfig, values or {}).validate()


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
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        try:
            values = config_to_dict(_from_dict(TrainConfig, loaded))
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
