"""easy-VQA (the `easy_vqa` package: 64x64 shape images, 13 one-word answers) as single-turn samples."""

from torch.utils.data import Dataset

from .images import check_images_exist, load_image
from .messages import single_turn


class EasyVQADataset(Dataset):
    """easy-VQA questions: `{"id", "images": [image], "messages": [user question, assistant answer],
    "answer", "image_id"}`; `dataset.answers` lists the 13 possible answers."""

    def __init__(self, split: str = "train", skip_missing: bool = False):
        import easy_vqa  # optional dependency (extra "easyvqa")

        if split not in ("train", "test"):
            raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
        if split == "train":
            questions, answers, image_ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, image_ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        self.answers = list(easy_vqa.get_answers())
        entries = [{"id": f"{split}-{index}", "question": q, "answer": a, "image_id": i, "path": paths[i]}
                   for index, (q, a, i) in enumerate(zip(questions, answers, image_ids))]
        self.entries, self.num_skipped = check_images_exist(entries, lambda e: [e["path"]], skip_missing,
                                                            f"easy-VQA {split}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def text_lengths(self) -> list[int]:
        """Characters of each sample's question and answer, for length-grouped batches."""
        return [len(entry["question"]) + len(entry["answer"]) for entry in self.entries]

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {
            "id": entry["id"],
            "images": [load_image(entry["path"])],
            "messages": single_turn(entry["question"], entry["answer"]),
            "answer": entry["answer"],
            "image_id": entry["image_id"],
        }
