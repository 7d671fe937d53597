"""Where everything in a synthetic-scenes folder lies: the one place that knows its layout.

`data.scenes.generate_scenes` writes, for each split, `images/{split}/{id:012d}.{png|jpg}`,
`instances_{split}.json` (COCO instances), `captions_{split}.json` (COCO captions), `conversations_{split}.json`
(LLaVA) and `pope_{split}_{strategy}.json` (POPE), and once `chair_vocab.json` and `scene_config.json`.
Training, evaluation and the demo find these files through a `ScenesFolder`.
"""

import json
from functools import cached_property
from pathlib import Path


def scene_image_name(image_id: int, image_format: str) -> str:
    return f"{int(image_id):012d}.{image_format}"


class ScenesFolder:
    def __init__(self, root):
        self.root = Path(root)

    def images(self, split: str) -> Path:
        return self.root / "images" / split

    def image(self, split: str, image_id: int) -> Path:
        return self.images(split) / scene_image_name(image_id, self.image_format)

    @cached_property
    def image_format(self) -> str:
        """"png" or "jpg", as the folder's `scene_config.json` records (`SceneConfig.image_format`)."""
        return self.scene_config().get("image_format", "png")

    def instances(self, split: str) -> Path:
        return self.root / f"instances_{split}.json"

    def captions(self, split: str) -> Path:
        return self.root / f"captions_{split}.json"

    def conversations(self, split: str) -> Path:
        return self.root / f"conversations_{split}.json"

    def pope(self, split: str, strategy: str) -> Path:
        return self.root / f"pope_{split}_{strategy}.json"

    @property
    def chair_vocabulary(self) -> Path:
        return self.root / "chair_vocab.json"

    @property
    def config_file(self) -> Path:
        return self.root / "scene_config.json"

    def scene_config(self) -> dict:
        """The `SceneConfig` the folder was generated with, as plain values."""
        self.require(self.config_file)
        return json.loads(self.config_file.read_text(encoding="utf-8"))

    def is_generated(self) -> bool:
        return self.config_file.is_file()

    def require(self, *paths: Path) -> None:
        """A clear error naming the missing files and how to make them."""
        missing = [str(path) for path in paths if not Path(path).exists()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: generate "
                                    f"the scenes with `vlm data scenes --out {self.root}`")
