"""A shortened `vlm demo` end to end: every report section is there and its numbers are sane."""

import json
import re

import pytest

from eval.demo import run_demo

SECTIONS = ["Summary", "Training", "POPE (test split)", "Captions (COCO caption metrics)", "CHAIR",
            "Mitigation heads", "Sample captions", "Where the model looks"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, steps=DEMO_STEPS, num_images=DEMO_IMAGES, mitigations=["pai", "vcd"], progress=False)
    return out, result


DEMO_STEPS, DEMO_IMAGES = 30, 200


def test_report_has_every_section_and_its_pictures(demo):
    out, _ = demo
    report = (out / "report.md").read_text()
    titles = re.findall(r"^## (.+)$", report, flags=re.M)
    assert titles == SECTIONS
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).stat().st_size > 1000, image
    html = (out / "report.html").read_text()
    assert all(f"<h2>{title}</h2>" in html for title in SECTIONS)


def test_numbers_parse_back_and_are_sane(demo):
    out, result = demo
    report = (out / "report.md").read_text()
    rows = dict(re.findall(r"^\| (random|popular|adversarial) \| ([\d.]+) \|", report, flags=re.M))
    assert set(rows) == {"random", "popular", "adversarial"}
    pope = result["results"]["pope"]["splits"]
    for split, accuracy in rows.items():
        assert float(accuracy) == pytest.approx(100 * pope[split]["accuracy"], abs=0.05)
    # (a shortened run is too short for the model to ground its answers: accuracy is only checked for sense)
    assert all(0.0 <= float(accuracy) <= 100.0 for accuracy in rows.values())
    mitigation_rows = re.findall(r"^\| (none|pai|vcd) \| ([\d.]+) \|", report, flags=re.M)
    assert [name for name, _ in mitigation_rows] == ["none", "pai", "vcd"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["steps"] == DEMO_STEPS
    chair = saved["results"]["chair"]
    assert 0.0 <= chair["chair_i"] <= 1.0 and 0.0 <= chair["chair_s"] <= 1.0 and chair["avg_len"] > 0


def test_the_trained_model_is_a_normal_folder_for_the_cli(demo, capsys):
    from vlm.cli import main

    out, result = demo
    image = next((out / "scenes" / "images" / "test").iterdir())
    code = main(["ask", "--model", result["settings"]["model_dir"], str(image), "Is there a star in the image?", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]


def test_rerun_resumes_without_retraining(demo):
    out, result = demo
    again = run_demo(out, steps=DEMO_STEPS, num_images=DEMO_IMAGES, mitigations=["pai", "vcd"], progress=False)
    assert again["settings"]["train_seconds"] < 5  # the trained model was reused
    assert again["results"]["pope"]["splits"]["random"]["accuracy"] == result["results"]["pope"]["splits"]["random"]["accuracy"]
