"""`VLMProcessor`: images and conversations in, model-ready tensors out.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`; user
contents carry one `<image>` marker per image. Each message is tokenised segment by segment through a
chat template, so every token knows its role (`vlm.roles.TokenRole`): the roles drive the attention
mask modes, and the labels cover exactly the answer tokens.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

from .roles import TokenRole

# Where an image goes in a message content; every module that writes or reads prompts takes it from here.
IMAGE_MARKER = "<image>"

IGNORE_INDEX = -100
PROCESSOR_FILE = "processor_config.json"


@dataclass
class ChatTemplate:
    """How turns are written. The default is ChatML (SmolLM2, Qwen). The assistant header belongs to the
    prompt (image tokens may see it); the answer and its end marker are what the model learns to write."""

    system: str = "<|im_start|>system\n{content}<|im_end|>\n"
    user: str = "<|im_start|>user\n{content}<|im_end|>\n"
    assistant_header: str = "<|im_start|>assistant\n"
    assistant_end: str = "<|im_end|>"
    turn_separator: str = "\n"


class PromptTooLongError(ValueError):
    pass


class VLMProcessor:
    """Turns images and text into `input_ids`, `attention_mask`, `mm_token_type_ids` (roles), `labels`
    and `pixel_values` for `VisionLanguageModel`.

    Args:
        tokenizer: a Hugging Face tokenizer; `<image>` is added as a special token if it lacks it.
        image_size: square input size of the vision tower.
        mean, std: normalisation (timm data config of the tower).
        num_image_tokens: placeholders per image (the connector's output count).
        max_length: the LLM's context length; longer prompts are refused (or truncated in training).
        template: the chat template.
        interpolation: PIL resampling name for resizing ("bicubic", "bilinear", ...).
        prompts: the prompt conventions the model was trained with, saved with it: `vlm eval` uses them when no
            prompt option is given (keys "pope_suffix", "chair", "captions", "vqa_suffix"; see `eval.tasks`).
    """

    image_token = IMAGE_MARKER

    def __init__(self, tokenizer, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 num_image_tokens: int = 1, max_length: int | None = None, template: ChatTemplate | None = None,
                 interpolation: str = "bicubic", prompts: dict | None = None):
        self.tokenizer = tokenizer
        if self.image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [self.image_token]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.template = template or ChatTemplate()
        self.interpolation = interpolation
        self.prompts = dict(prompts or {})
        self._resample = Image.Resampling[interpolation.upper()]
        self.stop_token_id = tokenizer.convert_tokens_to_ids(self.template.assistant_end) \
            if self.template.assistant_end in tokenizer.get_vocab() else tokenizer.eos_token_id

    @classmethod
    def from_model(cls, model, tokenizer, template: ChatTemplate | None = None) -> "VLMProcessor":
        """The processor that matches `model`'s tower and connector; sets the model's image token id."""
        data_config = model.vision_tower.data_config
        processor = cls(
            tokenizer, image_size=model.config.image_size, mean=data_config["mean"], std=data_config["std"],
            num_image_tokens=model.num_image_tokens,
            max_length=getattr(model.config.text_config, "max_position_embeddings", None),
            template=template, interpolation=data_config.get("interpolation", "bicubic"),
        )
        if model.config.image_token_id != processor.image_token_id:
            model.set_image_token_id(processor.image_token_id)
        processor.configure_generation(model)
        return processor

    def configure_generation(self, model):
        """Write this processor's tokens into `model.generation_config` (saved with the model): generation stops
        at the end-of-answer token, pads with the pad token, and never writes the image placeholder (nor the pad
        token when it is not the stop token): a generated placeholder would ask the next step for an image."""
        config = model.generation_config
        config.eos_token_id = self.stop_token_id
        config.pad_token_id = self.tokenizer.pad_token_id
        never = [self.image_token_id]
        if self.tokenizer.pad_token_id not in (None, self.stop_token_id):
            never.append(self.tokenizer.pad_token_id)
        config.suppress_tokens = sorted(set(config.suppress_tokens or []) | set(never))

    def __repr__(self) -> str:
        # stable across runs: evaluation settings files record it
        return (f"VLMProcessor(image_size={self.image_size}, num_image_tokens={self.num_image_tokens}, "
                f"vocab={len(self.tokenizer)}, template={self.template})")

    # ---------------------------------------------------------------- images
    def preprocess_images(self, images) -> torch.Tensor:
        """PIL RGB images -> normalised (N, 3, image_size, image_size) float tensor."""
        arrays = []
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {index} is a {type(image).__name__}, expected a PIL.Image")
            if image.mode != "RGB":
                raise ValueError(
                    f"image {index} has mode {image.mode!r}; convert it to RGB first "
                    "(data.images.load_image does this for files, compositing alpha on white)"
                )
            if image.width < 1 or image.height < 1:
                raise ValueError(f"image {index} is empty ({image.width}x{image.height})")
            resized = image.resize((self.image_size, self.image_size), self._resample)
            arrays.append(np.asarray(resized, dtype=np.float32))
        if not arrays:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    # ------------------------------------------------------------------ text
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _user_tokens(self, content: str) -> tuple[list[int], list[int]]:
        ids, roles = [], []
        head, tail = self.template.user.split("{content}")
        pieces = content.split(self.image_token)
        for position, piece in enumerate(pieces):
            text = (head if position == 0 else "") + piece + (tail if position == len(pieces) - 1 else "")
            tokens = self._tokens(text)
            ids += tokens
            roles += [TokenRole.PROMPT] * len(tokens)
            if position < len(pieces) - 1:
                ids += [self.image_token_id] * self.num_image_tokens
                roles += [TokenRole.IMAGE] * self.num_image_tokens
        return ids, roles

    def encode_conversation(self, messages: list[dict], num_images: int | None = None,
                            add_generation_prompt: bool = False) -> dict:
        """One conversation -> lists `input_ids`, `roles`, `labels` (labels = ids on answer tokens only)."""
        if not messages:
            raise ValueError("empty conversation: give at least one user message")
        ids, roles, markers = [], [], 0
        for turn, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"message {turn}: 'content' must be a string, got {type(content).__name__}")
            if role == "user":
                if not content.strip(self.image_token + " \n\t"):
                    raise ValueError(f"message {turn}: the user prompt is empty")
                markers += content.count(self.image_token)
                turn_ids, turn_roles = self._user_tokens(content)
            elif role == "system":
                turn_ids = self._tokens(self.template.system.format(content=content))
                turn_roles = [TokenRole.SYSTEM] * len(turn_ids)
            elif role == "assistant":
                header = self._tokens(self.template.assistant_header)
                answer = self._tokens(content + self.template.assistant_end)
                separator = self._tokens(self.template.turn_separator)
                turn_ids = header + answer + separator
                turn_roles = [TokenRole.PROMPT] * len(header) + [TokenRole.ANSWER] * len(answer) \
                    + [TokenRole.PROMPT] * len(separator)
            else:
                raise ValueError(f"message {turn}: role must be 'system', 'user' or 'assistant', got {role!r}")
            ids += turn_ids
            roles += turn_roles
        if num_images is not None and markers != num_images:
            raise ValueError(f"the text has {markers} {self.image_token} markers but {num_images} images were given")
        if add_generation_prompt:
            header = self._tokens(self.template.assistant_header)
            ids += header
            roles += [TokenRole.PROMPT] * len(header)
        labels = [t if r == TokenRole.ANSWER else IGNORE_INDEX for t, r in zip(ids, roles)]
        return {"input_ids": ids, "roles": [int(r) for r in roles], "labels": labels}

    def encode_prompt(self, messages: list[dict], images: list) -> dict:
        """One generation request: the conversation and the assistant header, tokenised and length-checked."""
        encoded = self.encode_conversation(messages, num_images=len(images), add_generation_prompt=True)
        self.check_length(encoded)
        return encoded

    def truncate(self, encoded: dict, max_length: int) -> tuple[dict, bool]:
        """Cut a too-long sample at `max_length` tokens from the end (answers go first). Refuses a cut that
        would split or drop image tokens, or leave no answer token to learn from."""
        if len(encoded["input_ids"]) <= max_length:
            return encoded, False
        roles = encoded["roles"]
        if TokenRole.IMAGE in roles[max_length:]:
            raise PromptTooLongError(f"cutting this {len(roles)}-token sample to {max_length} would drop image tokens")
        if TokenRole.ANSWER not in roles[:max_length]:
            raise PromptTooLongError(f"the prompt alone is longer than {max_length} tokens: no answer would remain")
        return {key: value[:max_length] for key, value in encoded.items()}, True

    def check_length(self, encoded: dict, index: int = 0):
        if self.max_length is not None and len(encoded["input_ids"]) > self.max_length:
            raise PromptTooLongError(
                f"sample {index} is {len(encoded['input_ids'])} tokens long, more than the LLM's context of "
                f"{self.max_length} tokens"
            )

    def collate(self, encoded: list[dict], images: list) -> BatchFeature:
        """Left-pad encoded samples into tensors and preprocess their images (all images of the batch, in order)."""
        longest = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.tokenizer.pad_token_id

        def padded(key, fill):
            return torch.tensor([[fill] * (longest - len(e[key])) + e[key] for e in encoded], dtype=torch.long)

        input_ids = padded("input_ids", pad_id)
        roles = padded("roles", int(TokenRole.PADDING))
        batch = {
            "input_ids": input_ids,
            "attention_mask": (roles != TokenRole.PADDING).long(),
            "mm_token_type_ids": roles,
            "labels": padded("labels", IGNORE_INDEX),
        }
        if images:
            batch["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(batch)

    def apply_conversations(self, conversations: list[list[dict]], images: list[list] | None = None,
                            add_generation_prompt: bool = False) -> BatchFeature:
        """Training/teacher-forcing batches: conversations with their per-sample image lists."""
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        encoded = []
        for index, (messages, sample_images) in enumerate(zip(conversations, images)):
            try:
                sample = self.encode_conversation(messages, len(sample_images), add_generation_prompt)
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from None
            self.check_length(sample, index)
            encoded.append(sample)
        batch = self.collate(encoded, [image for sample_images in images for image in sample_images])
        if add_generation_prompt:
            del batch["labels"]
        return batch

    def __call__(self, images=None, text=None, return_tensors: str = "pt", system: str | None = None) -> BatchFeature:
        """Inference inputs: each text is one user turn followed by the assistant header.

        `images` is a flat list consumed in `<image>`-marker order, or one list per text."""
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if text is None:
            raise ValueError(f"text is required (one prompt per sample, with {self.image_token} markers)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if isinstance(images, Image.Image) else list(images))
        if images and all(isinstance(item, (list, tuple)) for item in images):
            per_sample = [list(item) for item in images]
        else:
            counts = [t.count(self.image_token) for t in texts]
            if sum(counts) != len(images):
                raise ValueError(
                    f"the texts hold {sum(counts)} {self.image_token} markers but {len(images)} images were given"
                )
            offsets = np.cumsum([0] + counts)
            per_sample = [images[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
        conversations = [
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": t}]
            for t in texts
        ]
        return self.apply_conversations(conversations, per_sample, add_generation_prompt=True)

    def batch_decode(self, token_ids, skip_special_tokens: bool = True) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)]

    # ------------------------------------------------------------ save/load
    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        settings = {
            "image_size": self.image_size, "mean": self.mean, "std": self.std,
            "num_image_tokens": self.num_image_tokens, "max_length": self.max_length,
            "interpolation": self.interpolation, "template": asdict(self.template), "prompts": self.prompts,
        }
        (folder / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, folder) -> "VLMProcessor":
        folder = Path(folder)
        settings_file = folder / PROCESSOR_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file} is missing: is {folder} a folder saved by VLMProcessor.save_pretrained?")
        settings = json.loads(settings_file.read_text())
        settings["template"] = ChatTemplate(**settings["template"])
        return cls(AutoTokenizer.from_pretrained(folder), **settings)
