"""Co-occurrence probes: how often a model names a shape's usual partner when the partner is missing.

The synthetic scenes' bias rules say, for instance, "given a moon, a star is present 90% of the time". A probe is
an image that breaks a rule: a trigger (moon) without its partner (star). On POPE, a probe is a question about the
missing partner on such an image; in a caption, the partner named for such an image. The share of probes on which
the model claims the partner is the lab's direct measure of co-occurrence hallucination: POPE's adversarial split
mixes these questions with many others, and CHAIR_I counts every kind of hallucinated object.
"""

from dataclasses import dataclass

from data.jsonl import read_json
from data.pope import image_objects, pope_question
from data.scene_folder import ScenesFolder

from .pope import load_pope_answers, parse_pope_answer


def _share(claimed: int, probes: int) -> dict:
    return {"probes": probes, "claimed": claimed, "rate": claimed / probes if probes else None}


@dataclass
class CooccurrenceProbes:
    """The bias rules `(trigger, partner)` of a scenes folder and the shapes present in each image of a split."""

    pairs: list[tuple[str, str]]
    present: dict[str, set[str]]  # image file name -> shape categories in it

    @classmethod
    def from_scenes(cls, folder, split: str = "test") -> "CooccurrenceProbes":
        folder = ScenesFolder(folder)
        config = folder.scene_config()
        pairs = [(trigger, partner) for trigger, partners in config["cooccurrence"].items() for partner in partners]
        present = {name: set(objects) for name, objects in image_objects(read_json(folder.instances(split)))}
        return cls(pairs, present)

    def missing_partners(self, objects) -> set[str]:
        """Partners whose trigger is among `objects` while they are not."""
        return {partner for trigger, partner in self.pairs if trigger in objects and partner not in objects}

    def pope(self, questions: list[dict], answers_file, convention: str = "official") -> dict:
        """Of the questions about a missing partner, how many the answers in `answers_file` call present."""
        answers = load_pope_answers(answers_file)
        probes = claimed = 0
        for question in questions:
            missing = self.missing_partners(self.present[question["image"]])
            if question["text"] in {pope_question(partner) for partner in missing}:
                probes += 1
                claimed += parse_pope_answer(answers[question["question_id"]], convention) == "yes"
        return _share(claimed, probes)

    def captions(self, per_caption: list[dict]) -> dict:
        """Of the (image, missing partner) probes among CHAIR's `per_caption` entries, how many captions name the
        partner."""
        probes = claimed = 0
        for entry in per_caption:
            missing = self.missing_partners(set(entry["ground_truth"]))
            probes += len(missing)
            claimed += len(missing & set(entry["mentioned"]))
        return _share(claimed, probes)
