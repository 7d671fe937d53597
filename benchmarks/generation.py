"""Generation benchmark: our `generate` against transformers' `LlavaForConditionalGeneration` built with the
same vision tower size (ViT-Ti/16 at 224 px: 196 image tokens) and the same LLM, measured in one run.

    python -m benchmarks.generation generate [--batch-sizes 1 8] [--new-tokens 32] [--threads 2]

Prints prefill latency (time to the first token) and decode tokens/s (from the median interval between
consecutive tokens of one call, `benchmarks.timing.time_generations`) for each model and batch size, the ratio
ours/Llava for the causal mode, and the prefill cost of each non-causal mode relative to causal. The models are
timed interleaved, so that a busy machine slows all of them alike; repeats that spread widely are reported on
stderr.
"""

import argparse

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from benchmarks.timing import print_warnings, time_generations
from vlm.config import VLMConfig
from vlm.masks import ATTENTION_MODES
from vlm.modeling import VisionLanguageModel
from vlm.roles import TokenRole

IMAGE_TOKEN_ID = 500  # a placeholder id inside both vocabularies
PROMPT_TOKENS = 24


def llm_config(layers: int, hidden: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192),
                       vocab_size=8192, max_position_embeddings=2048, attn_implementation="sdpa")


def build_ours(text_config, mode):
    config = VLMConfig(vision="vit_tiny_patch16_224", vision_feature_layer=-2, connector="mlp2x_gelu",
                       text_config=text_config, attention_mode=mode, image_token_id=IMAGE_TOKEN_ID,
                       attn_implementation="sdpa")
    return VisionLanguageModel(config).eval()


def build_llava(text_config):
    vision = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3,
                              image_size=224, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=196, vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


def make_inputs(batch: int, image_tokens: int, with_roles: bool):
    prompt = torch.randint(600, 8000, (batch, PROMPT_TOKENS))
    ids = torch.cat([prompt[:, :4], torch.full((batch, image_tokens), IMAGE_TOKEN_ID), prompt[:, 4:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch, 3, 224, 224)}
    if with_roles:
        roles = torch.full_like(ids, int(TokenRole.PROMPT))
        roles[ids == IMAGE_TOKEN_ID] = TokenRole.IMAGE
        inputs["mm_token_type_ids"] = roles
    return inputs


def forced_greedy(model, inputs, new_tokens: int):
    """`generate(streamer)` for `time_generations`: exactly `new_tokens` greedy tokens (no early end)."""
    return lambda streamer: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, streamer=streamer)


def bench_generate(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text_config = llm_config(args.layers, args.hidden)
    llava = build_llava(text_config)
    ours = {mode: build_ours(text_config, mode) for mode in ATTENTION_MODES}
    print(f"LLM: {args.layers} layers, hidden {args.hidden}; vision: ViT-Ti/16 @224 (196 tokens); "
          f"{args.new_tokens} new tokens; {args.threads} threads")
    print(f"{'model':<42}{'batch':>6}{'prefill ms':>12}{'decode tok/s':>14}{'ratio vs ref':>14}")
    for batch in args.batch_sizes:
        generates = {"Llava (transformers)": forced_greedy(llava, make_inputs(batch, 196, with_roles=False),
                                                           args.new_tokens)}
        for mode, model in ours.items():
            generates[f"ours {mode}"] = forced_greedy(model, make_inputs(batch, 196, with_roles=True), args.new_tokens)
        timings = time_generations(generates, repeats=args.repeats)
        reference, causal = timings["Llava (transformers)"], timings["ours causal"]
        for name, timing in timings.items():
            if name == "ours causal":
                ratio = f"{reference.per_token.median / timing.per_token.median:.2f}x tok/s"
            elif name.startswith("ours"):
                ratio = f"{timing.prefill.median / causal.prefill.median:.2f}x prefill"
            else:
                ratio = ""
            decode_tokens_per_s = batch / timing.per_token.median  # each step adds one token to every sequence
            print(f"{name:<42}{batch:>6}{timing.prefill.median * 1e3:>12.1f}{decode_tokens_per_s:>14.1f}{ratio:>14}")
            print_warnings(timing)
    print("targets: ours causal >= 0.95x Llava decode tok/s; non-causal prefill <= 1.10x causal")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation")
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate", help="generate() throughput against LlavaForConditionalGeneration")
    gen.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--layers", type=int, default=12)
    gen.add_argument("--hidden", type=int, default=576)
    gen.add_argument("--threads", type=int, default=2)
    gen.add_argument("--repeats", type=int, default=3)
    gen.set_defaults(func=bench_generate)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
