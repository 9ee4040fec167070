"""vLLM plugin that gives Qwen2-Audio LoRA support and audio work sized to the real audio.

vLLM 0.32's ``Qwen2AudioForConditionalGeneration`` does not declare
``SupportsLoRA``, so an engine built with ``enable_lora=True`` refuses it. This
plugin registers :class:`serve.engine.model.Qwen2AudioLoRAForConditionalGeneration`
under the same architecture name; the same class computes features and runs the
audio encoder over each chunk's real audio, not its 30 s padding. It is installed as an entry point in the
``vllm.general_plugins`` group, which every vLLM process (API process, engine
core, workers, Ray actors) loads on start-up; registering the model only in the
calling process would not reach the engine's worker processes.
"""

from __future__ import annotations

ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
MODEL_CLASS = "serve.engine.model:Qwen2AudioLoRAForConditionalGeneration"


def register() -> None:
    """Entry point of the plugin: idempotent, cheap (the model module loads lazily)."""
    from vllm import ModelRegistry  # the entry point's module stays cheap: vLLM loads it in every process

    from serve.engine.vllm_private import apply_cpu_patches

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # Every vLLM process loads this plugin, engine core and model workers included.
    apply_cpu_patches()
