"""LLaVA-1.5 into `VisionLanguageModel` and back.

LLaVA-1.5 is a CLIP ViT whose penultimate block's patch tokens (no CLS) go through `mlp2x_gelu` into a Llama
decoder: exactly a `VisionLanguageModel` with timm's CLIP ViT (`vit_large_patch14_clip_336` and its sizes),
`vision_feature_layer=-2` and the `mlp2x_gelu` connector. Importing one gives it our attention-mask modes
(AKI's modality-mutual, Croc's bidirectional visual) and LoRA fine-tuning; exporting a causal model whose
tower and connector fit gives a folder that `LlavaForConditionalGeneration` loads, so that other tools
(lmms-eval's HF model, vLLM's transformers backend) run models trained here.

Two source layouts are read:
- `llava-hf` (`LlavaForConditionalGeneration.save_pretrained`, e.g. llava-hf/llava-1.5-7b-hf): loaded with
  transformers' own class, whose key conversions cover every release of that layout;
- the original LLaVA repository's (liuhaotian/llava-v1.5-7b: `model_type: llava_llama`, `model.layers.*`,
  `model.mm_projector.{0,2}.*`, the tower in `model.vision_tower.vision_tower.*` only when it was tuned): its
  config and weights are read as data, never its code; the CLIP tower comes from a `CLIPVisionModel` folder.

    vlm convert --to vlm llava-1.5-7b-hf my-llava            # then: vlm ask --model my-llava ...
    vlm convert --to vlm llava-v1.5-7b my-llava --vision-tower clip-vit-large-patch14-336
    vlm convert --to llava my-vlm my-vlm-llava-hf
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import VLMConfig
from .modeling import VisionLanguageModel
from .processing import IMAGE_MARKER, ChatTemplate, VLMProcessor

# timm's CLIP ViT: pre-norm, a class token, a patch embedding without bias and LayerNorm(eps=1e-5), as OpenAI's
CLIP_TOWER = "vit_large_patch14_clip_336"
# LLaVA-1.5's conversation format (vicuna_v1): "USER: <image>\nWhat is it? ASSISTANT: An owl.</s>"
LLAVA_TEMPLATE = ChatTemplate(system="{content} ", user="USER: {content} ", assistant_header="ASSISTANT:",
                              assistant_end="</s>", turn_separator="")
# the original repository's keys of the LLM and the projector -> LlavaForConditionalGeneration's
ORIGINAL_KEYS = [(r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
                 (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
                 (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
                 (r"^model\.(?!multi_modal_projector|vision_tower)", "model.language_model.")]


# ------------------------------------------------------------------------------------------ the tower
# timm ViT name -> CLIP name, per block and for the tower's own norms; weights and biases alike
BLOCK_RENAMES = (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
TOWER_RENAMES = (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm"))


def _tower_renames(depth: int) -> dict[str, str]:
    """timm name -> CLIP name of every tensor that maps one to one (not the class and position embeddings,
    which change shape, nor the fused qkv)."""
    pairs = [*TOWER_RENAMES, *((f"blocks.{i}.{ours}", f"encoder.layers.{i}.{theirs}")
                               for i in range(depth) for ours, theirs in BLOCK_RENAMES)]
    renames = {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in pairs for kind in ("weight", "bias")}
    return {**renames, "patch_embed.proj.weight": "embeddings.patch_embedding.weight"}


def _depth(keys, pattern: str) -> int:
    return 1 + max(int(match.group(1)) for key in keys if (match := re.match(pattern, key)))


def _clip_to_timm(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPVisionTransformer's tensors (`embeddings.*`, `encoder.layers.N.*`) -> timm ViT's."""
    depth = _depth(clip, r"encoder\.layers\.(\d+)\.")
    out = {ours: clip[theirs] for ours, theirs in _tower_renames(depth).items()}
    out["cls_token"] = clip["embeddings.class_embedding"].reshape(1, 1, -1)
    out["pos_embed"] = clip["embeddings.position_embedding.weight"].unsqueeze(0)
    for index in range(depth):
        for kind in ("weight", "bias"):
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
                [clip[f"encoder.layers.{index}.self_attn.{name}_proj.{kind}"] for name in "qkv"])
    return out


def _timm_to_clip(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_clip_to_timm`."""
    depth = _depth(tower, r"blocks\.(\d+)\.")
    out = {theirs: tower[ours] for ours, theirs in _tower_renames(depth).items()}
    out["embeddings.class_embedding"] = tower["cls_token"].reshape(-1)
    out["embeddings.position_embedding.weight"] = tower["pos_embed"].squeeze(0)
    for index in range(depth):
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", tower[f"blocks.{index}.attn.qkv.{kind}"].chunk(3)):
                out[f"encoder.layers.{index}.self_attn.{name}_proj.{kind}"] = part
    return out


def _tower_kwargs(vision_config) -> dict:
    """timm `create_model` arguments of `CLIP_TOWER` for a `CLIPVisionConfig`."""
    if vision_config.model_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"the LLaVA vision tower is a {vision_config.model_type!r}: only CLIP towers are converted")
    if vision_config.hidden_act not in ("quick_gelu", "gelu") or abs(vision_config.layer_norm_eps - 1e-5) > 1e-12:
        raise ValueError(f"CLIP tower with hidden_act={vision_config.hidden_act!r}, layer_norm_eps="
                         f"{vision_config.layer_norm_eps}: timm's CLIP ViT has quick_gelu or gelu and eps 1e-5")
    return {"img_size": vision_config.image_size, "patch_size": vision_config.patch_size,
            "embed_dim": vision_config.hidden_size, "depth": vision_config.num_hidden_layers,
            "num_heads": vision_config.num_attention_heads,
            "mlp_ratio": vision_config.intermediate_size / vision_config.hidden_size,
            "act_layer": vision_config.hidden_act}


def _timm_feature_layer(hf_layer) -> int:
    # HF indexes hidden_states, whose 0 is the embeddings: its layer k >= 1 is timm's block k - 1; negative
    # indices count from the end in both
    if not isinstance(hf_layer, int) or hf_layer == 0:
        raise ValueError(f"vision_feature_layer={hf_layer!r}: one block's output is converted (not a list, not 0)")
    return hf_layer - 1 if hf_layer > 0 else hf_layer


# ----------------------------------------------------------------------------------------- the models
# LlavaForConditionalGeneration's key prefix -> ours, for the projector and the LLM
MODEL_RENAMES = (("model.multi_modal_projector.linear_1.", "connector.fc1."),
                 ("model.multi_modal_projector.linear_2.", "connector.fc2."),
                 ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def _renamed(state: dict, prefixes) -> dict:
    """The tensors of `state` whose key starts with one of the `(old, new)` prefixes, under the new prefix."""
    return {new + key[len(old):]: value for key, value in state.items() for old, new in prefixes
            if key.startswith(old)}


def from_llava(llava, attention_mode: str = "causal") -> VisionLanguageModel:
    """A `VisionLanguageModel` with the weights of a `LlavaForConditionalGeneration` (tensors shared)."""
    config = llava.config
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ValueError(f"projector with {config.projector_hidden_act!r} activation (bias="
                         f"{getattr(config, 'multimodal_projector_bias', True)}): the mlp2x_gelu connector has GELU and biases")
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r} is neither 'default' (no CLS) nor 'full'")
    vision = config.vision_config
    ours = VisionLanguageModel(VLMConfig(
        vision=CLIP_TOWER, vision_kwargs=_tower_kwargs(vision),
        vision_feature_layer=_timm_feature_layer(config.vision_feature_layer),
        vision_keep_prefix_tokens=strategy == "full", connector="mlp2x_gelu", text_config=config.text_config,
        attention_mode=attention_mode, image_token_id=config.image_token_id, image_size=vision.image_size))
    state = llava.state_dict()
    tower = _renamed(state, [("model.vision_tower.", "")])
    weights = {f"vision_tower.model.{key}": value for key, value in _clip_to_timm(tower).items()}
    weights.update(_renamed(state, MODEL_RENAMES))
    ours.load_state_dict(weights, strict=True)
    ours.generation_config = llava.generation_config
    return ours.eval()


def _check_exportable(model: VisionLanguageModel):
    config, tower = model.config, model.vision_tower.model
    problems = []
    if config.attention_mode != "causal":
        problems.append(f"attention_mode={config.attention_mode!r} (LLaVA's decoder is causal)")
    if config.connector != "mlp2x_gelu":
        problems.append(f"connector={config.connector!r} (LLaVA's projector is mlp2x_gelu)")
    if type(tower).__name__ != "VisionTransformer" or tower.num_prefix_tokens != 1 or tower.cls_token is None \
            or tower.patch_embed.proj.bias is not None or isinstance(tower.norm_pre, torch.nn.Identity):
        problems.append(f"the tower {config.vision!r} (CLIP's ViT: pre-norm, one class token, no patch bias)")
    elif type(tower.blocks[0].mlp.act).__name__ not in ("QuickGELU", "GELU"):
        problems.append("the tower's activation (CLIP has quick_gelu or gelu)")
    if config.vision_feature_layer == -1:
        problems.append("vision_feature_layer=-1 (the tower's normed output; LLaVA reads a block's output)")
    if problems:
        raise ValueError("this VisionLanguageModel does not fit LLaVA: " + "; ".join(problems))


def to_llava(model: VisionLanguageModel):
    """A `LlavaForConditionalGeneration` with the weights of a causal `VisionLanguageModel` that fits it."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    _check_exportable(model)
    config, tower = model.config, model.vision_tower.model
    block = tower.blocks[0]
    vision = CLIPVisionConfig(
        hidden_size=tower.embed_dim, intermediate_size=block.mlp.fc1.out_features, num_hidden_layers=len(tower.blocks),
        num_attention_heads=block.attn.num_heads, image_size=config.image_size, patch_size=tower.patch_embed.patch_size[0],
        hidden_act="quick_gelu" if type(block.mlp.act).__name__ == "QuickGELU" else "gelu",
        layer_norm_eps=block.norm1.eps, projection_dim=tower.embed_dim)
    layer = config.vision_feature_layer
    llava_config = LlavaConfig(
        vision_config=vision, text_config=config.text_config, image_token_id=config.image_token_id,
        vision_feature_layer=layer + 1 if layer >= 0 else layer,
        vision_feature_select_strategy="full" if config.vision_keep_prefix_tokens else "default",
        image_seq_length=model.num_image_tokens, projector_hidden_act="gelu")
    llava = LlavaForConditionalGeneration(llava_config)
    state = model.state_dict()
    tower = _renamed(state, [("vision_tower.model.", "")])
    weights = {f"model.vision_tower.{key}": value for key, value in _timm_to_clip(tower).items()}
    weights.update(_renamed(state, [(ours, theirs) for theirs, ours in MODEL_RENAMES]))
    llava.load_state_dict(weights, strict=True)
    llava.generation_config = model.generation_config
    return llava.eval()


# ----------------------------------------------------------------------------------------- the folders
def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files, or of its `.bin` files read with weights_only=True."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {key: value for path in files for key, value in load_file(str(path)).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors nor pytorch_model*.bin weights")
    state = {}
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _original_llava(folder: Path, vision_tower):
    """`(LlavaForConditionalGeneration, tokenizer, image processor)` from the original repository's layout."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    settings = json.loads((folder / "config.json").read_text())
    if settings.get("mm_projector_type", "linear") != "mlp2x_gelu" or settings.get("mm_vision_select_feature",
                                                                                      "patch") != "patch":
        raise ValueError(f"{folder}: mm_projector_type={settings.get('mm_projector_type')!r}, mm_vision_select_feature="
                         f"{settings.get('mm_vision_select_feature')!r}: LLaVA-1.5 has mlp2x_gelu and patch")
    if vision_tower is None:
        raise ValueError(f"{folder} is in the original LLaVA layout, which holds no CLIP tower config: pass the "
                         f"CLIP folder its mm_vision_tower names ({settings.get('mm_vision_tower')}) as --vision-tower")
    clip = CLIPVisionModel.from_pretrained(vision_tower, dtype=torch.float32)
    text = LlamaConfig(**{key: value for key, value in settings.items()
                          if not key.startswith("mm_") and key not in ("model_type", "architectures", "auto_map")})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the model goes on to `from_llava` and our processor, so its image token is our marker
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    text.vocab_size = max(text.vocab_size, image_token_id + 1)
    config = LlavaConfig(vision_config=clip.config, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=settings.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    llava = LlavaForConditionalGeneration(config)
    weights = {f"model.vision_tower.{key.removeprefix('vision_model.')}": value
               for key, value in clip.state_dict().items()}
    for key, value in _read_weights(folder).items():
        for pattern, replacement in ORIGINAL_KEYS:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        weights[key] = value
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # rows for an added <image>
        if weights[name].shape[0] < text.vocab_size:
            grown = llava.state_dict()[name].clone()
            grown[:weights[name].shape[0]] = weights[name]
            weights[name] = grown
    llava.load_state_dict(weights, strict=True)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    except OSError:
        size = clip.config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return llava, tokenizer, image_processor


def import_llava(source, out, vision_tower=None, attention_mode: str = "causal") -> Path:
    """Convert a LLaVA-1.5 folder (`llava-hf` or the original layout) into a `VisionLanguageModel` folder with
    its `VLMProcessor` (LLaVA's tokenizer and conversation format, CLIP's normalisation)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source, out = Path(source), Path(out)
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        llava = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
        hf_processor = AutoProcessor.from_pretrained(source)
        tokenizer, image_processor = hf_processor.tokenizer, hf_processor.image_processor
    elif model_type == "llava_llama":
        llava, tokenizer, image_processor = _original_llava(source, vision_tower)
    else:
        raise ValueError(f"{source}: model_type {model_type!r} is not LLaVA ('llava' of llava-hf, 'llava_llama' of "
                         "the original repository)")
    model = from_llava(llava, attention_mode)
    crop = image_processor.crop_size  # a dict, or the fast processors' SizeDict
    processor = VLMProcessor(tokenizer, image_size=crop if isinstance(crop, int) else crop["height"],
                             mean=image_processor.image_mean, std=image_processor.image_std,
                             num_image_tokens=model.num_image_tokens,
                             max_length=getattr(model.config.text_config, "max_position_embeddings", None),
                             template=LLAVA_TEMPLATE, interpolation="bicubic")
    processor.configure_generation(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _jinja_template(template: ChatTemplate) -> str:
    """Our chat template as the Jinja template HF processors apply (string or typed-part contents). An image part
    becomes `<image>`, `LlavaProcessor`'s own image token (its default), which it expands to the patch tokens."""
    content = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
               "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
               "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")
    turn = {role: getattr(template, role).replace("{content}", content) for role in ("system", "user")}
    return ("{% for message in messages %}{% if not loop.first %}" + template.turn_separator + "{% endif %}"
            "{% if message['role'] == 'system' %}" + turn["system"] +
            "{% elif message['role'] == 'user' %}" + turn["user"] +
            "{% else %}" + template.assistant_header + content + template.assistant_end + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + template.turn_separator + template.assistant_header + "{% endif %}")


def export_llava(source, out) -> Path:
    """Write a `VisionLanguageModel` folder as a `llava-hf` folder (model, `LlavaProcessor`)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    source, out = Path(source), Path(out)
    model = VisionLanguageModel.from_pretrained(source, dtype=torch.float32)
    processor = VLMProcessor.from_pretrained(source)
    llava = to_llava(model)
    size = processor.image_size
    # our processor resizes to a square; CLIP's resizes the shorter side and crops the centre (equal on squares)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(processor.mean), image_std=list(processor.std))
    chat_template = _jinja_template(processor.template)
    hf_processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=llava.config.vision_config.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=chat_template)
    llava.save_pretrained(out)
    hf_processor.save_pretrained(out)
    return out
