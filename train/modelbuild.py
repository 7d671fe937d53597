"""Build the model and processor a recipe asks for (`ModelSpec`)."""

from .config import ModelSpec


def _text_config(spec: ModelSpec, vocab_size: int):
    from transformers import AutoConfig

    if spec.llm is not None:
        config = AutoConfig.from_pretrained(spec.llm)
    else:
        settings = dict(spec.text_config)
        if "model_type" not in settings:
            raise ValueError("model.text_config needs a 'model_type' (e.g. llama)")
        settings["vocab_size"] = vocab_size
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = spec.attn_implementation
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

    if spec.init_from is not None:
        model = VisionLanguageModel.from_pretrained(spec.init_from)
        return model, VLMProcessor.from_pretrained(spec.init_from)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>") if "<image>" in tokenizer.get_vocab() else None
    config = VLMConfig(
        vision=spec.vision, vision_kwargs=spec.vision_kwargs, vision_pretrained_file=spec.vision_pretrained_file,
        vision_feature_layer=spec.vision_feature_layer, image_size=spec.image_size, connector=spec.connector,
        connector_kwargs=spec.connector_kwargs, text_config=_text_config(spec, len(tokenizer)),
        text_pretrained_path=spec.llm, attention_mode=spec.attention_mode, image_token_id=image_token_id,
    )
    model = VisionLanguageModel(config)
    processor = VLMProcessor.from_model(model, tokenizer)
    processor.prompts = dict(spec.prompts)
    return model, processor
