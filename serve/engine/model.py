"""vLLM's Qwen2-Audio with LoRA on its language model, its audio work sized to the real audio.

Only the language model's linear layers take LoRA (the audio tower and the
projector are not vLLM linear layers). Adapter keys are accepted in both
naming schemes peft has used for this model:

- transformers 5: ``base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight``
- transformers 4: ``base_model.model.language_model.model.layers.0.mlp.down_proj.lora_A.weight``

Both are mapped onto vLLM's module names (``language_model.model.layers...``);
without the mapping vLLM would silently apply nothing.

The log-mel features (:mod:`serve.engine.log_mel`) and the audio encoder
(:mod:`serve.engine.audio_encoder`) work over each chunk's real audio instead of 30 s
of padding; the results are the same, the work is proportional to the chunk's
length.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import SupportsLoRA
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.qwen2_audio import (
    Qwen2AudioDummyInputsBuilder,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioMultiModalProcessor,
    Qwen2AudioProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from serve.engine.audio_encoder import encode_valid_frames
from serve.engine.log_mel import UnpaddedWhisperFeatureExtractor
from serve.engine.vllm_private import AudioInputHook
from serve.engine.weight_names import TRANSFORMERS5_TO_PUBLISHED

# transformers 5 names -> vLLM module names. transformers 4 names already match.
TRANSFORMERS5_TO_VLLM = WeightsMapper(orig_to_new_prefix=dict(TRANSFORMERS5_TO_PUBLISHED))


class Qwen2AudioUnpaddedProcessingInfo(Qwen2AudioProcessingInfo):
    """vLLM's processing info for Qwen2-Audio, its feature extractor swapped for the unpadded one."""

    def get_hf_processor(self, **kwargs: object):
        processor = super().get_hf_processor(**kwargs)  # cached by vLLM: swapped once
        if not isinstance(processor.feature_extractor, UnpaddedWhisperFeatureExtractor):
            processor.feature_extractor = UnpaddedWhisperFeatureExtractor.from_dict(
                processor.feature_extractor.to_dict()
            )
        return processor


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2AudioMultiModalProcessor,
    info=Qwen2AudioUnpaddedProcessingInfo,
    dummy_inputs=Qwen2AudioDummyInputsBuilder,
)
class Qwen2AudioLoRAForConditionalGeneration(AudioInputHook, Qwen2AudioForConditionalGeneration, SupportsLoRA):
    """vLLM's Qwen2-Audio with ``SupportsLoRA`` declared, features and encoder over real audio only."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = TRANSFORMERS5_TO_VLLM

    def get_mm_mapping(self) -> MultiModelKeys:
        """Module prefixes of the three parts of the model."""
        return MultiModelKeys.from_string_field(
            language_model="language_model.",
            connector="multi_modal_projector.",
            tower_model="audio_tower.",
        )

    def embed_audio_features(self, features, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Audio embeddings of each chunk, the encoder run over its real frames only."""
        if isinstance(features, list):
            features = torch.stack(features)
        encoded = encode_valid_frames(self.audio_tower, features, mel_lengths)
        lengths = [len(e) for e in encoded]
        return torch.split(self.multi_modal_projector(torch.cat(encoded)), lengths)
