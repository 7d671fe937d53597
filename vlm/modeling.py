"""`VisionLanguageModel`: a timm vision tower, a connector and any Hugging Face causal LLM.

Image placeholder tokens in `input_ids` are replaced by connector outputs; the attention mask of the
prefill follows `config.attention_mode` (see `vlm.masks`); decode steps are plain causal, so the KV
cache stays valid. Generation is Hugging Face's `generate` (this class is a `GenerationMixin`).
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import VLMConfig
from .connectors import build_connector
from .masks import build_attention_mask
from .roles import TokenRole
from .vision import VisionTower


def check_attention_backend(mode: str, backend) -> None:
    """FlashAttention silently drops custom masks: refuse it for every mode but causal."""
    name = backend if isinstance(backend, str) else ""
    if mode != "causal" and name.startswith("flash"):
        raise ValueError(
            f"attention_mode={mode!r} needs a custom attention mask, which {name} ignores: "
            "use attn_implementation='sdpa' or 'eager'"
        )


class VisionLanguageModel(PreTrainedModel, GenerationMixin):
    config_class = VLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = []

    def __init__(self, config: VLMConfig, vision_model: nn.Module | None = None):
        """`vision_model`: an already built timm model to use as the tower (e.g. with weights of your own);
        `config.vision` / `vision_kwargs` must describe it, so that a saved model can rebuild it."""
        check_attention_backend(config.attention_mode, config._attn_implementation)
        super().__init__(config)
        if vision_model is not None:
            architecture = getattr(vision_model, "pretrained_cfg", {}).get("architecture")
            if architecture and architecture != config.vision:
                raise ValueError(f"vision_model is a {architecture} but config.vision is {config.vision!r}")
        self.vision_tower = VisionTower(
            vision_model if vision_model is not None else config.vision, config.vision_feature_layer,
            config.vision_keep_prefix_tokens, model_kwargs=config.vision_kwargs,
            pretrained_file=config.vision_pretrained_file,
        )
        if config.vision_hidden_size is None or config.vision_num_tokens is None or config.image_size is None:
            self._measure_vision_tower()
        if config.text_pretrained_path:
            self.language_model = AutoModelForCausalLM.from_pretrained(
                config.text_pretrained_path, config=config.text_config, dtype=torch.float32
            )
        else:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # One config object for the LLM: a vocabulary grown by the image token must be what config.json saves.
        config.text_config = self.language_model.config
        self.connector = build_connector(
            config.connector, config.vision_hidden_size, config.text_config.hidden_size, **config.connector_kwargs
        )
        self.num_image_tokens = self.connector.num_output_tokens(config.vision_num_tokens)
        if config.image_token_id is not None:
            self.set_image_token_id(config.image_token_id)
        if config.freeze_vision:
            self.vision_tower.requires_grad_(False)
        self.post_init()

    def _measure_vision_tower(self):
        """Record the tower's input size, token count and width in the config (one dry run)."""
        cfg = self.config
        if cfg.image_size is None:
            size = cfg.vision_kwargs.get("img_size") or self.vision_tower.data_config["input_size"][-1]
            cfg.image_size = size if isinstance(size, int) else size[-1]
        with torch.no_grad():
            tokens = self.vision_tower(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        cfg.vision_num_tokens, cfg.vision_hidden_size = tokens.shape[1], tokens.shape[2]

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        check_attention_backend(self.config.attention_mode, attn_implementation)
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _init_weights(self, module):
        # The LLM and the timm tower initialise themselves when built; only the connector is ours.
        if isinstance(module, nn.Linear) and any(module is m for m in self.connector.modules()):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_image_token_id(self, token_id: int):
        """Use `token_id` as the image placeholder, growing the LLM's vocabulary if the id is new to it."""
        self.config.image_token_id = token_id
        if token_id >= self.get_input_embeddings().num_embeddings:
            self.language_model.resize_token_embeddings(token_id + 1)

    def set_compressed_grid(self, grid: int | tuple[int, int]) -> None:
        """Inference with a LookupViT tower's compressed tokens on a `grid` (m for m x m, or (h, w)): a coarser
        grid costs less, a finer one sees more; ValueError for other towers. The weights and the number of
        image tokens stay as they are. The grid is written into `config.vision_kwargs` (the timm kwarg), so a
        model saved now reloads with it."""
        self.vision_tower.set_compressed_grid(grid)
        self.config.vision_kwargs["compressed_grid"] = grid

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) -> (num_images, num_image_tokens, D_llm)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must be (num_images, 3, {size}, {size}) for this vision tower, got "
                f"{tuple(pixel_values.shape)}: preprocess images with the model's VLMProcessor"
            )
        dtype = next(self.vision_tower.parameters()).dtype
        return self.connector(self.vision_tower(pixel_values.to(dtype)))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image placeholders replaced by image features."""
        image_positions = input_ids == self.config.image_token_id
        num_placeholders = int(image_positions.sum())
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))
        if pixel_values is None:
            if num_placeholders:
                raise ValueError(f"input_ids hold {num_placeholders} image placeholder tokens but no pixel_values were given")
            return embeds
        features = self.get_image_features(pixel_values).to(embeds.dtype)
        if features.shape[0] * features.shape[1] != num_placeholders:
            raise ValueError(
                f"{features.shape[0]} images give {features.shape[0] * features.shape[1]} image tokens, but input_ids "
                f"hold {num_placeholders} placeholders ({self.num_image_tokens} per image expected)"
            )
        return embeds.masked_scatter(image_positions[..., None], features.reshape(-1, features.shape[-1]))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            batch, length = inputs_embeds.shape[:2]
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            # positions count real tokens only, so left-padded rows match unpadded ones
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
        decoder_mask = attention_mask
        if self.config.attention_mode != "causal":
            decoder_mask = self._mode_mask(inputs_embeds, attention_mask, mm_token_type_ids, past_length)
        return self.language_model(
            attention_mask=decoder_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )

    def generate(self, *args, mitigation=None, processor=None, **kwargs):
        """Hugging Face `generate`; `mitigation` (a method name, list, dict of options or "vhr,pai:alpha=0.2")
        switches decode-time hallucination mitigation on for this call (see `vlm.mitigation`); `processor` is
        this model's, for the methods that rewrite the prompt (ICD, LQCD)."""
        if not mitigation:
            return super().generate(*args, **kwargs)
        from .mitigation import mitigated_generate

        return mitigated_generate(self, mitigation, super().generate, *args, processor=processor, **kwargs)

    def _mode_mask(self, inputs_embeds, attention_mask, roles, past_length):
        if roles is None:
            raise ValueError(
                f"attention_mode={self.config.attention_mode!r} needs token roles (mm_token_type_ids) from the processor"
            )
        if past_length:
            # Cached decode steps add answer tokens, for which every mode is causal.
            if (roles == TokenRole.IMAGE).any():
                raise ValueError("image tokens after a filled KV cache cannot get the non-causal mask: prefill them")
            return attention_mask
        check_attention_backend(self.config.attention_mode, self.language_model.config._attn_implementation)
        return build_attention_mask(
            self.language_model.config, inputs_embeds, attention_mask, roles, self.config.attention_mode,
            tokens_per_image=self.num_image_tokens,
        )


