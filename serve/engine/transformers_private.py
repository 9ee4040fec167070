"""Every use of transformers internals in the project: written for transformers >=5.16.1,<5.20.0.

transformers documents its model, processor and feature-extractor classes and
their ``from_pretrained``/``from_config`` constructors; methods with a leading
underscore it may change in any release. What the project needs of them is
here and nowhere else (``tests/test_fences.py`` checks that):

- ``WhisperFeatureExtractor._torch_extract_fbank_features``, the log-mel step
  that :class:`serve.engine.log_mel.UnpaddedWhisperFeatureExtractor` replaces
  (:class:`FbankHook`);
- ``Qwen2AudioEncoder._get_feat_extract_output_lengths`` (:func:`encoder_output_lengths`);
- ``PreTrainedModel._from_config``, a model of random weights in a given dtype (:func:`model_from_config`).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

WRITTEN_FOR = (">=5.16.1", "<5.20.0")  # as pyproject.toml pins it
if not Version("5.16.1") <= Version(transformers.__version__) < Version("5.20.0"):
    raise ImportError(
        f"serve.engine.transformers_private was written for transformers {','.join(WRITTEN_FOR)}, but transformers "
        f"{transformers.__version__} is installed: install the pinned range or re-check this module"
    )


class FbankHook:
    """Mixin for ``WhisperFeatureExtractor``: its private log-mel step calls ``log_mel`` of the subclass.

    ``padded_log_mel`` is transformers' own computation, for the subclass to fall back on.
    """

    def _torch_extract_fbank_features(self, waveform, device: str = "cpu"):
        return self.log_mel(waveform, device)

    def padded_log_mel(self, waveform, device: str = "cpu"):
        """transformers' log-mel features of ``waveform`` (padded to 30 s)."""
        return super()._torch_extract_fbank_features(waveform, device)


def encoder_output_lengths(tower, mel_lengths):
    """``(conv_lengths, token_lengths)`` of a Qwen2-Audio encoder for inputs of ``mel_lengths`` frames."""
    return tower._get_feat_extract_output_lengths(mel_lengths)


def model_from_config(model_class, config, dtype):
    """A ``model_class`` of random weights built from ``config`` directly in ``dtype``."""
    return model_class._from_config(config, dtype=dtype)
