"""Hugging Face image-text-to-text models (Llava, Qwen2-VL, Idefics3 / SmolVLM, Gemma 3, ...) as they are.

A folder that `AutoModelForImageTextToText` and `AutoProcessor` load runs through the same runner, evaluation
and command line as a `VisionLanguageModel`: `ChatProcessor` gives the family's own processor the small
interface the runner uses (`encode_prompt`, `collate`, `batch_decode`), and prompts are written by the
processor's chat template, so each family sees exactly the prompt format it was trained on.

Prompts use the suite's `<image>` markers (`"<image>\\nWhat is this?"`); they become the `{"type": "image"}`
entries of a chat message, which the template turns into the family's own image tokens.
"""

import json
import pickle
import re
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from .processing import IMAGE_MARKER, PromptTooLongError


def chat_content(text: str) -> list[dict]:
    """`"<image>\\nWhat is this?"` -> `[{"type": "image"}, {"type": "text", "text": "What is this?"}]`.

    A line break right after a marker belongs to the marker (the family's template writes its own)."""
    content = []
    for index, piece in enumerate(text.split(IMAGE_MARKER)):
        if index:
            content.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            content.append({"type": "text", "text": piece})
    return content


class ChatProcessor:
    """A Hugging Face processor behind the interface of `VLMProcessor` that the runner uses.

    Args:
        processor: what `AutoProcessor.from_pretrained` returns for the model's folder; it must carry a chat
            template (that is how prompts are written).
        max_length: the LLM's context length; longer prompts are refused.
    """

    image_token = IMAGE_MARKER

    def __init__(self, processor, max_length: int | None = None):
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{type(processor).__name__} has no chat template: the suite writes prompts with it "
                             "(save one with processor.save_pretrained, chat_template.jinja)")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        self.max_length = max_length

    def __repr__(self) -> str:
        # stable across runs: evaluation settings files record it
        return f"ChatProcessor({type(self.processor).__name__}, vocab={len(self.tokenizer)})"

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the family's chat template writes for `messages` (string contents with markers)."""
        converted = []
        for turn, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {turn}: 'content' must be a string, got {type(message.get('content')).__name__}")
            converted.append({"role": message["role"], "content": chat_content(message["content"])})
        return self.processor.apply_chat_template(converted, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def prompt_edit(self, plain: list[dict], edited: list[dict]) -> tuple[list[int], ...]:
        """How the family's template changes the tokens of a prompt when `plain` messages become `edited`:
        `(head, removed, added, tail)` with plain = head + removed + tail and edited = head + added + tail."""
        a, b = (self.tokenizer(self.render(messages))["input_ids"] for messages in (plain, edited))
        head = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        tail = 0
        while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
            tail += 1
        return a[:head], a[head:len(a) - tail], b[head:len(b) - tail], a[len(a) - tail:]

    def encode_prompt(self, messages: list[dict], images: list) -> dict:
        """One request -> `{"text", "num_images", "length"}`; refuses marker/image count mismatches and prompts
        longer than the context (the length counts the image tokens the processor expands for these images)."""
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))
        if markers != len(images):
            raise ValueError(f"the text has {markers} {IMAGE_MARKER} markers but {len(images)} images were given")
        text = self.render(messages)
        length = self.processor(text=[text], images=[images] if images else None,
                                return_tensors="pt")["input_ids"].shape[1]
        if self.max_length is not None and length > self.max_length:
            raise PromptTooLongError(f"the prompt is {length} tokens long, more than the LLM's context of "
                                     f"{self.max_length} tokens")
        return {"text": text, "num_images": len(images), "length": length}

    def collate(self, encoded: list[dict], images: list):
        """A left-padded batch of encoded requests; `images` are all their images, in request order."""
        nested, start = [], 0
        for item in encoded:
            nested.append(images[start:start + item["num_images"]])
            start += item["num_images"]
        return self.processor(text=[item["text"] for item in encoded], images=nested if images else None,
                              padding=True, return_tensors="pt")

    def batch_decode(self, token_ids, skip_special_tokens: bool = True) -> list[str]:
        return self.processor.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)


def read_model_type(folder) -> str | None:
    """The `model_type` of a saved model folder (None when config.json lacks one)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if "auto_map" in config:
        raise ValueError(f"{path}: this model needs its own code from the folder (auto_map, trust_remote_code), "
                         "which the suite never runs")
    return config.get("model_type")


def from_pretrained_checked(model_class, folder, dtype: torch.dtype = torch.float32):
    """`model_class.from_pretrained(folder)`, refusing what transformers lets through with a warning or a page of
    traceback: a weights file lacking some of the model's tensors (they would be random), and a pickled `.bin`
    holding Python objects besides tensors (torch's weights-only loader stops it; unpickling it could run code)."""
    try:
        model, info = model_class.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"an object of type {found.group(1)}" if found else "Python objects"
        raise ValueError(f"{folder}: its pickled weights file holds {what} besides tensors and was refused (unpickling "
                         "it could run code); save the weights as safetensors from a copy you trust") from None
    missing = info["missing_keys"]
    if missing:
        raise ValueError(f"{folder}: the weights lack {len(missing)} of the model's tensors ({', '.join(sorted(missing)[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): the folder holds another model's weights")
    return model.eval()


def load_image_text_model(folder, dtype: torch.dtype = torch.float32):
    """`(model, ChatProcessor)` from a folder that `AutoModelForImageTextToText` + `AutoProcessor` load."""
    folder = Path(folder)
    model_type = read_model_type(folder)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"{folder}: model_type {model_type!r} is neither a VisionLanguageModel ('vlm') nor an "
                         "image-text-to-text model that transformers' AutoModelForImageTextToText loads")
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder}: no processor could be loaded ({error}); save it beside the model with "
                         "processor.save_pretrained") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(f"{folder}: AutoProcessor gave a {type(processor).__name__}, not a processor with a "
                         "tokenizer and an image processor: save the model's processor with save_pretrained")
    model = from_pretrained_checked(AutoModelForImageTextToText, folder, dtype)
    text_config = model.config.get_text_config()
    return model, ChatProcessor(processor, getattr(text_config, "max_position_embeddings", None))
