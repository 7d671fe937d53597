"""The training data mix: datasets from `data/` built from a recipe's `data.sources`."""

from itertools import islice

import numpy as np
from torch.utils.data import ConcatDataset, Subset

from data.scene_folder import ScenesFolder

from .config import DataConfig, DataSource

# How many samples per dataset a from-scratch tokenizer is trained on.
TOKENIZER_SAMPLES = 5000


def _require(source: DataSource, index: int, *names):
    for name in names:
        if getattr(source, name) is None:
            raise ValueError(f"data.sources.{index} (kind {source.kind}) needs '{name}'")


def _require_scenes_file(folder: ScenesFolder, index: int, path) -> None:
    try:
        folder.require(path)
    except FileNotFoundError as missing:
        raise FileNotFoundError(f"data.sources.{index}: {missing}") from None


def build_dataset(source: DataSource, index: int = 0):
    """The map-style dataset (of contract sample dicts) for one source."""
    if source.kind == "scenes":
        from data.llava import LlavaConversationDataset

        _require(source, index, "path")
        folder = ScenesFolder(source.path)
        _require_scenes_file(folder, index, folder.conversations(source.split))
        dataset = LlavaConversationDataset(folder.conversations(source.split), folder.images(source.split),
                                           **source.options)
    elif source.kind == "scene_captions":
        from data.coco import CocoCaptionsDataset

        _require(source, index, "path")
        folder = ScenesFolder(source.path)
        _require_scenes_file(folder, index, folder.captions(source.split))
        dataset = CocoCaptionsDataset(folder.captions(source.split), folder.images(source.split), **source.options)
    elif source.kind == "easyvqa":
        from data.easyvqa import EasyVQADataset

        dataset = EasyVQADataset(source.split, **source.options)
    elif source.kind == "llava":
        from data.llava import LlavaConversationDataset

        _require(source, index, "path", "image_root")
        dataset = LlavaConversationDataset(source.path, source.image_root, **source.options)
    elif source.kind == "coco":
        from data.coco import CocoCaptionsDataset

        _require(source, index, "path", "image_root")
        dataset = CocoCaptionsDataset(source.path, source.image_root, **source.options)
    else:
        raise ValueError(f"data.sources.{index}: unknown kind {source.kind!r}")
    if source.limit is not None:
        dataset = Subset(dataset, range(min(source.limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"data.sources.{index} ({source.kind} {source.path or source.split}) has no samples")
    return dataset


class TrainingMix(ConcatDataset):
    """The datasets of a recipe, indexed by the sampler's `(index, draw)` pairs. A dataset that varies a sample
    per draw (a random reference caption: `draw_item`) gets an RNG seeded by (seed, draw), so the samples are the
    same for any number of processes and after a resume."""

    def __init__(self, datasets: list, seed: int):
        super().__init__(datasets)
        self.seed = seed

    def __getitem__(self, key):
        index, draw = key
        source = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        dataset = self.datasets[source]
        index -= self.cumulative_sizes[source - 1] if source else 0
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, dataset.indices[index]
        if hasattr(dataset, "draw_item"):
            return dataset.draw_item(index, np.random.default_rng([self.seed, draw]))
        return dataset[index]


def build_datasets(data: DataConfig) -> list:
    return [build_dataset(source, index) for index, source in enumerate(data.sources)]


def text_lengths(dataset, index: int = 0) -> list[int]:
    """`dataset.text_lengths`, through a `Subset` too; a clear error for a dataset that has none."""
    if isinstance(dataset, Subset):
        lengths = text_lengths(dataset.dataset, index)
        return [lengths[i] for i in dataset.indices]
    if not hasattr(dataset, "text_lengths"):
        raise ValueError(f"data.group_by_length: data.sources.{index} ({type(dataset).__name__}) has no "
                         "text_lengths; switch group_by_length off")
    return list(dataset.text_lengths)


def conversation_texts(datasets, per_dataset: int = TOKENIZER_SAMPLES):
    """The message texts of (up to `per_dataset`) samples of each dataset, for training a tokenizer."""
    for dataset in datasets:
        for sample in islice((dataset[i] for i in range(len(dataset))), per_dataset):
            for message in sample["messages"]:
                yield message["content"]


def make_collate(processor, max_length: int | None):
    """Batches with answer-only labels; over-long samples are cut from the end (see `data.collate`)."""
    from data.collate import VLMCollator

    return VLMCollator(processor, max_length=max_length)
