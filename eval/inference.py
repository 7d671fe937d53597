"""Batched generation over images: load a saved model, turn requests (images + prompt) into answers.

Every request is prepared on its own (image files loaded, prompt tokenised and length-checked), so a corrupt
or missing image, a decompression bomb or a too-long prompt becomes an error record for that request while
the others of the batch are still answered. Prepared requests are left-padded into one batch and decoded
with Hugging Face `generate` (greedy, sampling or beam search; `mitigation=` is passed through).
"""

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from data.images import DEFAULT_MAX_PIXELS, load_image
from vlm.processing import IMAGE_MARKER

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Request:
    """One generation request.

    Args:
        record: JSON-ready fields copied into the result (ids, labels, file names...).
        prompt: the user turn; `<image>\\n` is put in front when it holds no `<image>` marker.
        images: image file paths (loaded lazily, at batch time) or PIL images.
    """

    record: dict
    prompt: str
    images: list = field(default_factory=list)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA when available (the process's own GPU under `accelerate launch`), else CPU; anything else
    is passed to `torch.device`."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: {error}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                             f"use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU that supports it, float32 otherwise; or one of `DTYPES`."""
    if dtype == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(folder, device: str = "auto", dtype: str = "auto"):
    """`(model, processor)` from a model folder: one written by `VisionLanguageModel.save_pretrained` and
    `VLMProcessor.save_pretrained`, or any Hugging Face image-text-to-text model with its processor (Llava,
    Qwen2-VL, Idefics3, Gemma 3, ...; see `vlm.hf_models`)."""
    from vlm import VisionLanguageModel, VLMProcessor
    from vlm.hf_models import from_pretrained_checked, load_image_text_model, read_model_type

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: pass a folder saved with model.save_pretrained")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if read_model_type(folder) != "vlm":
        model, processor = load_image_text_model(folder, torch_dtype)
        return model.to(torch_device), processor
    model = from_pretrained_checked(VisionLanguageModel, folder, torch_dtype).to(torch_device)
    processor = VLMProcessor.from_pretrained(folder)
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(f"{folder}: the processor's image token id {processor.image_token_id} differs from the "
                         f"model's {model.config.image_token_id}: model and processor were saved from different runs")
    return model, processor


def collect_image_paths(inputs: Iterable) -> list[Path]:
    """Image files named directly, plus those found recursively (sorted) in directories, by extension.

    A path that does not exist is kept, so that it is reported as an error for that input."""
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def user_prompt(prompt: str, num_images: int, image_token: str = IMAGE_MARKER) -> str:
    """The prompt with one `<image>` marker per image in front, unless it already places its markers."""
    if image_token in prompt:
        return prompt
    return f"{image_token}\n" * num_images + prompt


def prepare_request(processor, request: Request, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Load the images and tokenise the prompt of one request -> `(encoded, images)`.

    Raises `OSError` (unreadable image) or `ValueError` (too-long prompt, marker count, bad mode)."""
    images = [image if isinstance(image, Image.Image) else load_image(image, max_pixels) for image in request.images]
    for index, image in enumerate(images):
        if image.mode != "RGB":
            raise ValueError(f"image {index} has mode {image.mode!r}; expected RGB (use data.images.load_image)")
    messages = [{"role": "user", "content": user_prompt(request.prompt, len(images), processor.image_token)}]
    return processor.encode_prompt(messages, images), images


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


@torch.no_grad()
def generate_batch(model, processor, prepared: list, generation_kwargs: dict, streamer=None) -> list[str]:
    """Answers for prepared `(encoded, images)` pairs, generated as one left-padded batch."""
    encoded = [item[0] for item in prepared]
    images = [image for item in prepared for image in item[1]]
    inputs = processor.collate(encoded, images)
    inputs.pop("labels", None)
    inputs = inputs.to(model.device)
    generation_kwargs = dict(generation_kwargs)
    mitigation = generation_kwargs.pop("mitigation", None)
    if mitigation:
        from vlm.mitigation import generate_with_mitigation

        output = generate_with_mitigation(model, mitigation, processor, **inputs, **generation_kwargs,
                                          streamer=streamer)
    else:
        output = model.generate(**inputs, **generation_kwargs, streamer=streamer)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_answers(model, processor, requests: list[Request], generation_kwargs: dict | None = None,
                     batch_size: int = 8, max_pixels: int | None = DEFAULT_MAX_PIXELS, streamer=None,
                     progress: bool = False) -> Iterator[list[dict]]:
    """Answer `requests` batch by batch; yields each batch's result records as soon as they are ready.

    A result is `{**request.record, "answer": text}`, or `{**request.record, "error": message}` when the
    request's images or prompt could not be prepared. `streamer` (e.g. `transformers.TextStreamer`) needs
    `batch_size=1`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if streamer is not None and batch_size != 1:
        raise ValueError("streaming prints one answer at a time: use batch_size=1")
    generation_kwargs = dict(generation_kwargs or {})
    bar = tqdm(total=len(requests), disable=not progress, unit="req", dynamic_ncols=True)
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            results, ready = [None] * len(chunk), []
            for index, request in enumerate(chunk):
                try:
                    ready.append((index, prepare_request(processor, request, max_pixels)))
                except (OSError, ValueError) as error:
                    results[index] = {**request.record, "error": _describe(error)}
            if ready:
                answers = generate_batch(model, processor, [item for _, item in ready], generation_kwargs, streamer)
                for (index, _), answer in zip(ready, answers):
                    results[index] = {**chunk[index].record, "answer": answer}
            bar.update(len(chunk))
            yield results
    finally:
        bar.close()
