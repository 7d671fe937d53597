"""Dataset readers: COCO captions (COCO and Karpathy formats), LLaVA conversations, POPE, easy-VQA, and
their errors on bad input (malformed JSON, missing fields or images, paths leaving the image root)."""

import json

import pytest
from PIL import Image

from data.coco import CocoCaptionsDataset
from data.easyvqa import EasyVQADataset
from data.images import UnsafePathError
from data.jsonl import DataFormatError, read_json, read_jsonl
from data.llava import LlavaConversationDataset
from data.pope import PopeDataset, read_pope_file
from data.scenes import SceneConfig, generate_scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return generate_scenes(folder, 12, seed=5, config=SceneConfig(splits={"train": 0.75, "val": 0.25}))


def check_sample(sample, num_images=1):
    assert len(sample["images"]) == num_images
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in sample["images"])
    users = [m["content"] for m in sample["messages"] if m["role"] == "user"]
    assert sum(text.count("<image>") for text in users) == num_images
    assert all(m["role"] in ("system", "user", "assistant") for m in sample["messages"])


# ---------------------------------------------------------------- JSON helpers
def test_malformed_json_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\r\n\r\n{"a": 2}\r\n{"a": \r\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:4: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "images": [\n    {"id": 1,}\n  ]\n}')
    with pytest.raises(DataFormatError, match=r"broken.json:3:\d+: invalid JSON"):
        read_json(broken)


def test_pope_file_missing_field_or_bad_label(tmp_path):
    path = tmp_path / "pope.json"
    path.write_text('{"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?", "label": "yes"}\n'
                    '{"question_id": 2, "image": "a.png", "label": "no"}\n')
    with pytest.raises(DataFormatError, match=r"pope.json: question 2: missing field 'text'"):
        read_pope_file(path)
    path.write_text('{"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?", "label": "Yes"}\n')
    with pytest.raises(DataFormatError, match="label must be 'yes' or 'no'"):
        read_pope_file(path)


# ---------------------------------------------------------------- COCO captions
def test_coco_captions_from_scenes(scenes):
    dataset = CocoCaptionsDataset(scenes["captions"]["train"], scenes["images"]["train"])
    captions = json.loads(scenes["captions"]["train"].read_text())["annotations"]
    assert len(dataset) == 9
    sample = dataset[0]
    check_sample(sample)
    references = [c["caption"] for c in captions if c["image_id"] == sample["id"]]
    assert sample["references"] == references and len(references) == 5
    assert sample["messages"] == [{"role": "user", "content": "<image>\nDescribe the image."},
                                  {"role": "assistant", "content": references[0]}]
    assert sample["images"][0].size == (64, 64)
    with pytest.raises(ValueError, match="Karpathy"):
        CocoCaptionsDataset(scenes["captions"]["train"], scenes["images"]["train"], split="train")


def test_karpathy_split_file(tmp_path):
    for folder, name in [("val2014", "a.jpg"), ("val2014", "b.jpg"), ("train2014", "c.jpg")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (8, 6), (9, 9, 9)).save(tmp_path / folder / name)
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A cat. "}, {"raw": "A small cat."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "A dog."}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "train", "cocoid": 3, "sentences": [{"raw": "A bus."}]},
    ], "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    test = CocoCaptionsDataset(tmp_path / "dataset_coco.json", tmp_path, split="test", prompt="Caption:")
    assert len(test) == 1 and test[0]["references"] == ["A cat.", "A small cat."]
    assert test[0]["messages"][0]["content"] == "<image>\nCaption:" and test[0]["image_file"] == "val2014/a.jpg"
    train = CocoCaptionsDataset(tmp_path / "dataset_coco.json", tmp_path, split=["train", "restval"])
    assert sorted(sample["id"] for sample in train) == [2, 3]
    assert len(CocoCaptionsDataset(tmp_path / "dataset_coco.json", tmp_path)) == 3


def test_missing_images_raise_or_are_counted(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "here.png")
    data = {"images": [{"id": 1, "file_name": "here.png"}, {"id": 2, "file_name": "gone.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 2, "caption": "y"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=r"1 sample.*gone.png"):
        CocoCaptionsDataset(tmp_path / "captions.json", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        dataset = CocoCaptionsDataset(tmp_path / "captions.json", tmp_path, skip_missing=True)
    assert len(dataset) == 1 and dataset.num_skipped == 1


def test_annotation_paths_cannot_escape(tmp_path):
    data = {"images": [{"id": 1, "file_name": "../secret.png"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    with pytest.raises(UnsafePathError, match="secret.png"):
        CocoCaptionsDataset(tmp_path / "captions.json", tmp_path / "images")
    data["annotations"][0]["image_id"] = 7
    data["images"][0]["file_name"] = "a.png"
    (tmp_path / "captions.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"captions.json: annotations\[0\]: image_id 7"):
        CocoCaptionsDataset(tmp_path / "captions.json", tmp_path)


# ---------------------------------------------------------------- LLaVA
def test_llava_conversations_from_scenes(scenes):
    dataset = LlavaConversationDataset(scenes["conversations"]["val"], scenes["images"]["val"])
    records = json.loads(scenes["conversations"]["val"].read_text())
    assert len(dataset) == len(records) == 6
    for sample, record in zip(dataset, records):
        check_sample(sample)
        assert sample["id"] == record["id"]
        assert [m["content"] for m in sample["messages"]] == [t["value"] for t in record["conversations"]]
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"] * (len(record["conversations"]) // 2)


def test_llava_jsonl_multi_image_and_marker_insertion(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(tmp_path / name)
    records = [
        {"id": "two", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Same."}]},
        {"id": "no-marker", "image": "a.png", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "Blank."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dataset = LlavaConversationDataset(tmp_path / "chat.jsonl", tmp_path)
    check_sample(dataset[0], num_images=2)
    assert dataset[0]["images"][0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    second = dataset[1]
    check_sample(second)
    assert second["messages"][0] == {"role": "system", "content": "Be brief."}
    assert second["messages"][1]["content"] == "<image>\nWhat is it?"
    assert dataset[2]["images"] == [] and dataset[2]["messages"][-1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("record, message", [
    ({"id": 5, "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                   {"from": "gpt", "value": "x"}]}, "2 <image> markers but 1 images"),
    ({"id": 5, "conversations": [{"from": "robot", "value": "hi"}]}, r"conversations\[0\]: unknown speaker 'robot'"),
    ({"id": 5, "conversations": [{"from": "human"}]}, r"conversations\[0\]: missing field 'value'"),
    ({"id": 5, "conversations": [{"from": "human", "value": "hi"}]}, "must end with a gpt answer"),
    ({"id": 5}, "missing field 'conversations'"),
])
def test_llava_bad_records_name_the_record(tmp_path, record, message):
    good = {"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}
    (tmp_path / "chat.json").write_text(json.dumps([good, record]))
    with pytest.raises(DataFormatError, match=r"chat.json: record 1 \(id 5\).*" + message):
        LlavaConversationDataset(tmp_path / "chat.json", tmp_path)


def test_llava_paths_cannot_escape(tmp_path):
    record = {"id": 1, "image": "/etc/hostname", "conversations": [{"from": "human", "value": "<image>"},
                                                                   {"from": "gpt", "value": "x"}]}
    (tmp_path / "chat.json").write_text(json.dumps([record]))
    with pytest.raises(UnsafePathError, match="absolute"):
        LlavaConversationDataset(tmp_path / "chat.json", tmp_path)


# ---------------------------------------------------------------- POPE and easy-VQA
def test_pope_dataset_from_scenes(scenes):
    dataset = PopeDataset(scenes["pope"]["train"]["adversarial"], scenes["images"]["train"],
                          prompt_suffix=" Answer yes or no.")
    questions = read_pope_file(scenes["pope"]["train"]["adversarial"])
    assert len(dataset) == len(questions) > 0
    sample = dataset[1]
    check_sample(sample)
    assert sample["id"] == 2 and sample["label"] == "no" and sample["question"] == questions[1]["text"]
    assert sample["messages"] == [{"role": "user", "content": f"<image>\n{questions[1]['text']} Answer yes or no."}]


def test_pope_dataset_missing_images(scenes, tmp_path):
    with pytest.raises(FileNotFoundError, match="skip_missing"):
        PopeDataset(scenes["pope"]["train"]["random"], tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        dataset = PopeDataset(scenes["pope"]["train"]["random"], tmp_path, skip_missing=True)
    assert len(dataset) == 0 and dataset.num_skipped == len(read_pope_file(scenes["pope"]["train"]["random"]))


def test_easy_vqa():
    pytest.importorskip("easy_vqa")
    dataset = EasyVQADataset("test")
    assert len(dataset) == 9673 and len(dataset.answers) == 13
    sample = dataset[0]
    check_sample(sample)
    assert sample["images"][0].size == (64, 64)
    assert sample["messages"][1] == {"role": "assistant", "content": sample["answer"]}
    assert sample["answer"] in dataset.answers
    assert sample["messages"][0]["content"].startswith("<image>\n") and sample["messages"][0]["content"].endswith("?")
    with pytest.raises(ValueError, match="splits"):
        EasyVQADataset("validation")


def test_text_lengths_for_length_grouping(scenes):
    from torch.utils.data import Subset

    from train.data import text_lengths

    llava = LlavaConversationDataset(scenes["conversations"]["train"], scenes["images"]["train"])
    assert llava.text_lengths == [sum(len(m["content"]) for m in llava[i]["messages"]) for i in range(len(llava))]
    coco = CocoCaptionsDataset(scenes["captions"]["train"], scenes["images"]["train"], prompt="Caption it.")
    references = coco[2]["references"]
    assert coco.text_lengths[2] == len("Caption it.") + round(sum(map(len, references)) / len(references))
    assert text_lengths(Subset(llava, [3, 1])) == [llava.text_lengths[3], llava.text_lengths[1]]
    pope = PopeDataset(scenes["pope"]["train"]["random"], scenes["images"]["train"])
    with pytest.raises(ValueError, match="data.sources.2 \\(PopeDataset\\) has no text_lengths"):
        text_lengths(pope, 2)


def test_random_captions_are_drawn_per_draw_not_per_process(tmp_path):
    """The training mix draws a random reference caption with an RNG seeded by the sample's draw number: the same
    (index, draw) gives the same caption in any order (any process, after a resume); other draws vary it."""
    from train.data import TrainingMix

    generate_scenes(tmp_path, 40, seed=0)
    captions = CocoCaptionsDataset(tmp_path / "captions_train.json", tmp_path / "images" / "train",
                                   random_caption=True)
    mix = TrainingMix([captions], seed=0)
    keys = [(index, draw) for draw, index in enumerate([0, 1, 2, 0, 1, 2] * 5)]

    def answer(key):
        return mix[key]["messages"][1]["content"]

    forward, backward = [answer(key) for key in keys], [answer(key) for key in reversed(keys)][::-1]
    assert forward == backward
    assert len({answer((0, draw)) for draw in range(40)}) > 1  # the five references of image 0 all get drawn
    assert mix[(0, 3)]["id"] == captions[0]["id"]
