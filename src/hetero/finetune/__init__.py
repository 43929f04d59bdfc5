"""LoRA fine-tuning over a frozen, planned base: data, adapter modules, the training loop, PEFT files."""
