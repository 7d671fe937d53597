"""Datasets for vision-language training and evaluation.

Every dataset yields the suite's sample dict:
`{"id": str | int, "images": [PIL.Image (RGB)], "messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...], **extras}`, with one `<image>` marker per image in the user contents, in order.

- `scenes`: the built-in synthetic shape scenes with controllable co-occurrence bias (COCO-format output);
- `coco`, `llava`, `pope`, `easyvqa`: readers for the public formats;
- `images`: safe image loading; `jsonl`: JSON/JSON Lines reading with file:line errors;
- `collate.VLMCollator` (imported from `data.collate`, it needs `vlm`): samples -> model batches.
"""

from .coco import CocoCaptionsDataset
from .easyvqa import EasyVQADataset
from .images import ImageLoadError, UnsafePathError, load_image, resolve_image_path
from .jsonl import DataFormatError, read_json, read_jsonl, write_jsonl
from .llava import LlavaConversationDataset
from .pope import PopeDataset, generate_pope, read_pope_file, write_pope_file
from .scenes import SceneConfig, generate_scenes

__all__ = [
    "CocoCaptionsDataset", "EasyVQADataset", "LlavaConversationDataset", "PopeDataset",
    "SceneConfig", "generate_scenes", "generate_pope", "read_pope_file", "write_pope_file",
    "load_image", "resolve_image_path", "ImageLoadError", "UnsafePathError",
    "DataFormatError", "read_json", "read_jsonl", "write_jsonl",
]
