"""Generation benchmark: our `generate` against transformers' `LlavaForConditionalGeneration` built with the
same vision tower size (ViT-Ti/16 at 224 px: 196 image tokens) and the same LLM, measured in one run.

    python -m vlm.bench generate [--batch-sizes 1 8] [--new-tokens 32] [--threads 2]

Prints prefill latency and decode tokens/s for each model and batch size, the ratio ours/Llava for the
causal mode, and the prefill cost of each non-causal mode relative to causal.
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .config import VLMConfig
from .masks import ATTENTION_MODES
from .modeling import VisionLanguageModel
from .roles import TokenRole

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


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, inputs, new_tokens: int, repeats: int) -> dict:
    prefill = timed(lambda: model(**inputs, use_cache=True), repeats)
    total = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False), repeats)
    batch = inputs["input_ids"].shape[0]
    return {"prefill_s": prefill, "decode_tok_s": batch * (new_tokens - 1) / max(total - prefill, 1e-9)}


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
        reference = measure(llava, make_inputs(batch, 196, with_roles=False), args.new_tokens, args.repeats)
        print(f"{'Llava (transformers)':<42}{batch:>6}{reference['prefill_s'] * 1e3:>12.1f}{reference['decode_tok_s']:>14.1f}{'':>14}")
        causal = None
        for mode, model in ours.items():
            result = measure(model, make_inputs(batch, 196, with_roles=True), args.new_tokens, args.repeats)
            if mode == "causal":
                causal = result
                ratio = f"{result['decode_tok_s'] / reference['decode_tok_s']:.2f}x tok/s"
            else:
                ratio = f"{result['prefill_s'] / causal['prefill_s']:.2f}x prefill"
            print(f"{'ours ' + mode:<42}{batch:>6}{result['prefill_s'] * 1e3:>12.1f}{result['decode_tok_s']:>14.1f}{ratio:>14}")
    print("targets: ours causal >= 0.95x Llava decode tok/s; non-causal prefill <= 1.10x causal")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlm.bench")
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
