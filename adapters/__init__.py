"""Per-part LoRA adapters: their on-disk format, the tiny demo checkpoint, the reference scorer, training."""
