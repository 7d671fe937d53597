"""Fine-tuning of `vlm.VisionLanguageModel`: recipes (`train.config`), stages and LoRA (`train.stages`,
`train.lora`), the accelerate training loop (`train.finetune`), checkpoints with exact resume
(`train.checkpoint`) and offline pretrained assets (`train.assets`); its throughput benchmark is `benchmarks.training`.

Nothing heavy is imported here: `import train` stays cheap for the `vlm` command line."""
