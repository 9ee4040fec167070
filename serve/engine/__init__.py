"""Scoring with vLLM: request building, the offline and online engines, and the plugin every vLLM process loads.

Both engines, and the tests' stand-in, keep one contract (:mod:`serve.engine.contract`).

The plugin registers :mod:`serve.engine.model` (Qwen2-Audio with LoRA, its
features and encoder sized to the real audio) in vLLM's API process, engine
core and model workers; nothing here imports Ray.
"""
