"""Benchmarks, one module per question, all timed by `benchmarks.timing` (warm-up, repeats, minimum / median /
spread, a warning when the repeats spread widely, and per-step timing of generation). Each module prints its
ratios against the peer measured in the same run, and `--help` lists its options.

    python -m benchmarks.backbones --sizes 224 512 1024 --threads 2     # tiny backbones vs DeiT-Ti and DaViT-T:
                                                                        # latency, peak memory, FLOPs
    python -m benchmarks.generation generate --batch-sizes 1 8          # our generate vs transformers' Llava:
                                                                        # prefill and decode tokens/s
    python -m benchmarks.training --recipes demo_tiny                   # training throughput of the recipes,
                                                                        # one step split into its phases
    python -m benchmarks.mitigation --hf-families llava --threads 1     # mitigation methods: decode cost per token
    python -m benchmarks.mitigation --model DIR --scenes DIR            # ... and POPE / CHAIR on a scenes folder
"""
