"""LLaVA-style conversation files (LLaVA-Instruct, ShareGPT-4V, the synthetic scenes' conversations).

A record is `{"id", "image": str | [str, ...] (optional), "conversations": [{"from": "human"|"gpt", "value"}]}`
in a JSON array or in JSON Lines. `<image>` markers stand where the images go; a record with images but no
marker gets them in front of its first human turn, as LLaVA's own loader does.
"""

from torch.utils.data import Dataset

from vlm.processing import IMAGE_MARKER

from .images import DEFAULT_MAX_PIXELS, check_images_exist, load_image, resolve_image_path
from .jsonl import DataFormatError, read_json_records, require

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_messages(record: dict, source: str) -> tuple[list[dict], list[str]]:
    """The contract's messages and the image paths (as written) of one LLaVA record."""
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise DataFormatError(f"{source}: 'image' must be a path or a list of paths")
    turns = require(record, "conversations", source, list)
    messages = []
    for index, turn in enumerate(turns):
        where = f"{source}: conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataFormatError(f"{where}: expected an object with 'from' and 'value'")
        speaker = require(turn, "from", where, str)
        if speaker not in SPEAKERS:
            raise DataFormatError(f"{where}: unknown speaker {speaker!r} (expected one of {sorted(SPEAKERS)})")
        text = require(turn, "value", where, str)
        if SPEAKERS[speaker] != "user" and IMAGE_MARKER in text:
            raise DataFormatError(f"{where}: {IMAGE_MARKER} markers belong in human turns")
        messages.append({"role": SPEAKERS[speaker], "content": text})
    users = [m for m in messages if m["role"] == "user"]
    if not users or messages[-1]["role"] != "assistant":
        raise DataFormatError(f"{source}: a conversation needs a human turn and must end with a gpt answer")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in users)
    if markers == 0 and images:
        users[0]["content"] = f"{IMAGE_MARKER}\n" * len(images) + users[0]["content"]
    elif markers != len(images):
        raise DataFormatError(f"{source}: {markers} {IMAGE_MARKER} markers but {len(images)} images")
    return messages, images


class LlavaConversationDataset(Dataset):
    """LLaVA conversations (single or multi-turn, any number of images) as contract samples.

    Items: `{"id", "images": [...], "messages": [...], "image_files": [...]}`. Missing images raise at
    construction, or with `skip_missing=True` are skipped and counted in `num_skipped` (with a warning).
    """

    def __init__(self, json_path, image_root, skip_missing: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        entries = []
        for index, record in enumerate(read_json_records(json_path)):
            source = f"{json_path}: record {index} (id {record.get('id', '?')})"
            messages, files = llava_messages(record, source)
            paths = [resolve_image_path(image_root, name) for name in files]
            entries.append({"id": record.get("id", index), "messages": messages, "files": files, "paths": paths})
        self.entries, self.num_skipped = check_images_exist(entries, lambda e: e["paths"], skip_missing, json_path)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def text_lengths(self) -> list[int]:
        """Characters of each sample's text, without loading images (for length-grouped batches)."""
        return [sum(len(message["content"]) for message in entry["messages"]) for entry in self.entries]

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {
            "id": entry["id"],
            "images": [load_image(path, self.max_pixels) for path in entry["paths"]],
            "messages": [dict(message) for message in entry["messages"]],
            "image_files": list(entry["files"]),
        }
