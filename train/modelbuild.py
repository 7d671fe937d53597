"""Build the model and processor a recipe asks for (`ModelSpec`)."""

from .config import ModelSpec


def _text_config(spec: ModelSpec, vocab_size: int):
    """The LLM's config: the pretrained `llm`'s, or `vlm.text_config` with the tokenizer's vocabulary size."""
    from transformers import AutoConfig

    if spec.llm is not None:
        config = AutoConfig.from_pretrained(spec.llm)
    else:
        settings = dict(spec.vlm["text_config"])
        if "model_type" not in settings:
            raise ValueError("model.vlm.text_config needs a 'model_type' (e.g. llama)")
        settings["vocab_size"] = vocab_size
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = spec.vlm.get("attn_implementation", "sdpa")
    return config


def build_tokenizer(spec: ModelSpec, texts_fn):
    """The recipe's tokenizer: `tokenizer` folder, else the LLM's own, else a byte-level BPE trained on
    `texts_fn()` (the training texts; only called in that last case)."""
    from transformers import AutoTokenizer

    if spec.tokenizer is not None:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    if spec.llm is not None:
        return AutoTokenizer.from_pretrained(spec.llm)
    from vlm.tokenizer import train_tokenizer

    return train_tokenizer(texts_fn(), vocab_size=spec.tokenizer_vocab_size)


def build_model(spec: ModelSpec, tokenizer):
    """A new `VisionLanguageModel` for `spec` (random connector; pretrained LLM / vision weights when the
    recipe names them) and its `VLMProcessor`. With `init_from`, the saved model and processor instead."""
    from vlm import VisionLanguageModel, VLMConfig, VLMProcessor
    from vlm.processing import IMAGE_MARKER

    if spec.init_from is not None:
        model = VisionLanguageModel.from_pretrained(spec.init_from)
        return model, VLMProcessor.from_pretrained(spec.init_from)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER) if IMAGE_MARKER in tokenizer.get_vocab() else None
    options = {name: value for name, value in spec.vlm.items() if name not in ("text_config", "attn_implementation")}
    config = VLMConfig(**options, text_config=_text_config(spec, len(tokenizer)), text_pretrained_path=spec.llm,
                       image_token_id=image_token_id)
    model = VisionLanguageModel(config)
    processor = VLMProcessor.from_model(model, tokenizer)
    processor.prompts = dict(spec.prompts)
    return model, processor
