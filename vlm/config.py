"""`VLMConfig`: everything needed to rebuild a `VisionLanguageModel`."""

from transformers import AutoConfig, PretrainedConfig

from .connectors import CONNECTOR_CLASSES
from .masks import check_attention_mode


class VLMConfig(PretrainedConfig):
    """Configuration of a vision tower + connector + causal LLM.

    Args:
        vision: a `timm.create_model` name (any timm model, or one of `vision_backbones`).
        vision_kwargs: extra `timm.create_model` arguments (e.g. `{"img_size": 64}`).
        vision_pretrained_file: a local checkpoint for the vision tower, loaded once when the model is
            first built (saved folders carry the weights themselves, so it is not written to disk).
        vision_feature_layer: -1 for the tower's final features, or the index of an earlier block.
        vision_keep_prefix_tokens: keep CLS/register tokens in the visual sequence.
        freeze_vision: vision tower without gradients.
        connector: a key of `vlm.connectors.CONNECTOR_CLASSES`; `connector_kwargs` go to its constructor
            (`pixel_shuffle`: `factor`; `perceiver`: `num_latents`, `depth`, `num_heads`).
        text_config: a transformers causal-LM config (object or dict with `model_type`), or the path of a
            pretrained LLM folder whose weights are loaded when the model is first built.
        attention_mode: one of `vlm.masks.ATTENTION_MODES`.
        image_token_id: id of the `<image>` placeholder token in the tokenizer.
        image_size: input resolution of the vision tower (square).
        vision_hidden_size / vision_num_tokens: filled in when the model is first built.
    """

    model_type = "vlm"
    sub_configs = {"text_config": AutoConfig}
    # These paths point at weights used once at construction; a saved model holds the weights itself.
    _init_only_keys = ("vision_pretrained_file", "text_pretrained_path")

    def __init__(
        self,
        vision: str = "vit_tiny_patch16_224",
        vision_kwargs: dict | None = None,
        vision_pretrained_file: str | None = None,
        vision_feature_layer: int = -1,
        vision_keep_prefix_tokens: bool = False,
        freeze_vision: bool = False,
        connector: str = "mlp2x_gelu",
        connector_kwargs: dict | None = None,
        text_config=None,
        attention_mode: str = "causal",
        image_token_id: int | None = None,
        image_size: int | None = None,
        vision_hidden_size: int | None = None,
        vision_num_tokens: int | None = None,
        text_pretrained_path: str | None = None,
        **kwargs,
    ):
        if connector not in CONNECTOR_CLASSES:
            raise ValueError(f"connector={connector!r} is not one of {tuple(CONNECTOR_CLASSES)}")
        self.vision = vision
        self.vision_kwargs = dict(vision_kwargs or {})
        self.vision_pretrained_file = vision_pretrained_file
        self.vision_feature_layer = vision_feature_layer
        self.vision_keep_prefix_tokens = vision_keep_prefix_tokens
        self.freeze_vision = freeze_vision
        self.connector = connector
        self.connector_kwargs = dict(connector_kwargs or {})
        self.attention_mode = check_attention_mode(attention_mode)
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.vision_hidden_size = vision_hidden_size
        self.vision_num_tokens = vision_num_tokens
        self.text_pretrained_path = text_pretrained_path

        if isinstance(text_config, str):
            self.text_pretrained_path = text_config
            text_config = AutoConfig.from_pretrained(text_config)
        elif isinstance(text_config, dict):
            if "model_type" not in text_config:
                raise ValueError("text_config as a dict needs a 'model_type' (e.g. 'llama')")
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        elif text_config is None:
            text_config = AutoConfig.for_model("llama")
        self.text_config = text_config
        super().__init__(**kwargs)
        # generation settings live in the text model; tie_word_embeddings is decided by the LLM
        self.tie_word_embeddings = getattr(text_config, "tie_word_embeddings", False)

    def to_dict(self):
        output = super().to_dict()
        for key in self._init_only_keys:
            output.pop(key, None)
        return output
