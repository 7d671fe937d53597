import pytest
import torch
from PIL import Image

from eval.attention_map import image_attention, plot_attention_on_image
from vlm.testing import tiny_vlm


def test_attention_map_is_a_distribution_slice_over_the_image_grid(tmp_path):
    model, processor = tiny_vlm(attention_mode="modality_mutual")
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    inputs = processor(images=[image], text=["<image>\nDescribe the image."])
    sequences = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    query = sequences.shape[1] - 1
    grid = image_attention(model, inputs, sequences, query)
    assert grid.shape == (4, 4)
    # an independent computation: eager attentions of the full forward, averaged by hand
    model.set_attn_implementation("eager")
    roles = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 3, dtype=torch.long)], 1)
    out = model(input_ids=sequences, pixel_values=inputs["pixel_values"], mm_token_type_ids=roles, output_attentions=True)
    model.set_attn_implementation("sdpa")
    image_keys = (roles[0] == 3).nonzero().flatten()
    expected = sum(a[0, :, query, image_keys].mean(0) for a in out.attentions) / len(out.attentions)
    torch.testing.assert_close(grid.flatten(), expected)
    assert model.config._attn_implementation == "sdpa"
    plot_attention_on_image(image, grid, "word", tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_perceiver_has_no_grid():
    model, processor = tiny_vlm(connector="perceiver", connector_kwargs={"num_latents": 4, "depth": 1, "num_heads": 2})
    inputs = processor(images=[Image.new("RGB", (8, 8))], text=["<image> hi"])
    with pytest.raises(ValueError, match="no image grid"):
        image_attention(model, inputs, inputs["input_ids"], 0)
