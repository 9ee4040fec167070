"""Which frames of an answer are speech: Silero VAD (a small speech model, on CPU), or the loudness rule.

Silero VAD (``silero-vad`` on PyPI, MIT; its TorchScript weights ship in the
package and need only torch) gives each 32 ms frame (512 samples at 16 kHz,
with the 64 samples before it as context) a speech probability. Frames are
speech with hysteresis, as Silero's own segmenter does: from a probability of
``threshold`` on, until it falls under ``threshold - 0.15``. Unlike the
loudness rule (a frame is speech when its RMS is above ``audio.silence_dbfs``)
it tells steady noise, hum, music and clicks from speech, and hears quiet speech.

The model is loaded once per process and shared by every thread: its
encoder (STFT and convolutions, stateless) runs on all frames of an answer in
one batch, and its recurrent cell (an LSTM cell) runs over them as one
``torch.nn.LSTM`` sequence with the cell's weights, state kept per call. That
gives the package's frame-by-frame probabilities to 1e-6 at a fraction of the
cost, and nothing of the model changes during a call (thread-safe). torch's
intra-op threads are held at ``audio.vad_threads`` during a call, so decoding
threads do not take the cores of an engine beside them. This module is the
one place that reaches into the model's submodules.
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings

import numpy as np

from serve.grading import quality
from serve.grading.quality import SpeechFrames, loudness

SAMPLE_RATE = 16000
#: Samples of one frame, and of the context before it, that the 16 kHz model takes.
FRAME, CONTEXT = 512, 64
FRAME_S = FRAME / SAMPLE_RATE
#: A speech run ends when the probability falls this far under the threshold (Silero's own rule).
HYSTERESIS = 0.15
DETECTORS = ("silero_vad", "loudness")
#: Frames the encoder takes at once (~65 s of audio, ~5 MB of input): memory stays bounded on long answers.
BLOCK_FRAMES = 2048


class _Silero:
    """The packaged TorchScript model, split into its batched encoder and its recurrent cell as one LSTM."""

    def __init__(self) -> None:
        import torch  # here: loading the config or the grading core must not load torch

        path = importlib.metadata.distribution("silero-vad").locate_file("silero_vad/data/silero_vad.jit")
        # Not `import silero_vad`: importing it sets torch's threads to 1 for the whole process.
        with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated in favour of torch.export
            warnings.simplefilter("ignore", DeprecationWarning)
            jit = torch.jit.load(str(path), map_location="cpu").eval()
        inner = jit._model
        self.stft, self.encoder, self.head = inner.stft, inner.encoder, inner.decoder.decoder
        cell = inner.decoder.rnn
        with torch.random.fork_rng(devices=[]):  # its random initial weights must not move the process's seed
            self.lstm = torch.nn.LSTM(cell.weight_ih.shape[1], cell.weight_hh.shape[1]).eval()
        with torch.no_grad():
            for ours, theirs in (("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh")):
                getattr(self.lstm, ours).copy_(getattr(cell, theirs))
            for ours, theirs in (("bias_ih_l0", "bias_ih"), ("bias_hh_l0", "bias_hh")):
                getattr(self.lstm, ours).copy_(getattr(cell, theirs))
        self.torch = torch
        self.threads_fixed = False  # set once torch refuses to change its threads in this process

    def probabilities(self, wave: np.ndarray, threads: int) -> np.ndarray:
        """Speech probability of each whole frame, :data:`BLOCK_FRAMES` frames at a time (bounded memory)."""
        torch = self.torch
        n = len(wave) // FRAME
        if n == 0:
            return np.zeros(0, np.float32)
        padded = np.concatenate([np.zeros(CONTEXT, np.float32), np.asarray(wave[: n * FRAME], np.float32)])
        frames = np.lib.stride_tricks.sliding_window_view(padded, CONTEXT + FRAME)[::FRAME][:n]
        out = np.empty(n, np.float32)
        before = torch.get_num_threads()
        change = threads != before and not self.threads_fixed
        if change:
            torch.set_num_threads(threads)
            # A vLLM CPU engine in this process (offline path, sessions) replaces set_num_threads with a warning
            # that changes nothing: ask once, then keep the engine's threads instead of warning twice per answer.
            self.threads_fixed = torch.get_num_threads() != threads
            change = not self.threads_fixed
        try:
            with torch.inference_mode():
                state = None
                for a in range(0, n, BLOCK_FRAMES):
                    x = torch.from_numpy(np.ascontiguousarray(frames[a : a + BLOCK_FRAMES]))
                    features = self.encoder(self.stft(x)).squeeze(-1)  # (frames, 128)
                    hidden, state = self.lstm(features.unsqueeze(1), state)  # the cell over the frames in order
                    probs = self.head(hidden.squeeze(1).unsqueeze(-1))  # (frames, 1, 1)
                    out[a : a + len(x)] = probs.reshape(len(x), -1).mean(dim=1).numpy()
        finally:
            if change:
                torch.set_num_threads(before)
        return out


_model: _Silero | None = None
_lock = threading.Lock()


def model() -> _Silero:
    """The process's one Silero VAD model (loaded on first use, ~40 ms)."""
    global _model
    if _model is None:
        with _lock:
            if _model is None:
                _model = _Silero()
    return _model


def warm_up(audio_cfg) -> None:
    """Load the model and run it twice (TorchScript optimises on its first calls), so that a process's first
    answer does not wait for it: ~1-2 s and ~190 MB (torch) once per process. Nothing for the loudness rule."""
    if audio_cfg.speech_detector == "silero_vad":
        for _ in range(2):
            model().probabilities(np.zeros(SAMPLE_RATE, np.float32), audio_cfg.vad_threads)


def hysteresis(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Speech from the first frame at ``threshold`` until the probability falls under ``threshold - 0.15``."""
    on, off = threshold, max(0.0, threshold - HYSTERESIS)
    speech = np.zeros(probabilities.size, bool)
    state = False
    for i, p in enumerate(probabilities.tolist()):
        state = p >= on or (state and p >= off)
        speech[i] = state
    return speech


def silero(wave: np.ndarray, threshold: float = 0.5, threads: int = 1) -> SpeechFrames:
    """Silero VAD's speech frames of 16 kHz mono audio."""
    probs = model().probabilities(wave, threads)
    return SpeechFrames(
        FRAME_S, quality.frame_powers(wave, SAMPLE_RATE, FRAME_S), hysteresis(probs, threshold), "silero_vad", probs
    )


def detect(wave: np.ndarray, audio_cfg) -> SpeechFrames:
    """The speech frames by the config's detector (:class:`serve.grading.config.AudioConfig`)."""
    if audio_cfg.speech_detector == "loudness":
        return loudness(wave, audio_cfg.silence_dbfs)
    return silero(wave, audio_cfg.vad_threshold, audio_cfg.vad_threads)
