"""Every use of vLLM internals in the project: written for vllm 0.32.0, refused by any other release.

vLLM documents its entry points (``LLM``, ``AsyncLLM``, ``SamplingParams``,
``LoRARequest``), its plugin and model-registration interfaces; everything
else it may change in any release. What the project needs from the rest is
here and nowhere else (``tests/test_fences.py`` checks that), so an upgrade
means re-reading this one module:

- the Qwen2-Audio model's private ``_process_audio_input`` hook
  (:class:`AudioInputHook`), so the audio encoder runs over the real audio;
- ``gpu_sync_allowed`` (an undocumented debug guard) around that encoder;
- the engine core behind ``LLM`` (:func:`shutdown_engine`), and the name of its
  CPU worker's logger (:func:`log_thread_refusals_once`);
- two speed-ups for the CPU backend, applied by the plugin in every vLLM
  process: the shared-memory queue readers' ``SpinCondition`` and the CPU LoRA
  op tables. Found by profiling the service under load on the tiny checkpoint
  (2 cores): vLLM's engine core spun on ``sched_yield`` through every model
  step, and its CPU LoRA ops copied each token's adapter weights before
  multiplying. GPU hosts keep vLLM's own code. Set ``L2GRADER_ENGINE_SPIN_S=1``
  or ``L2GRADER_FAST_CPU_LORA=0`` to turn them off.
"""

from __future__ import annotations

import importlib
import logging
import os
import time

import torch
import vllm
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

WRITTEN_FOR = "0.32.0"
if vllm.__version__.split("+")[0] != WRITTEN_FOR:
    raise ImportError(
        f"serve.engine.vllm_private was written for vllm {WRITTEN_FOR}, but vllm {vllm.__version__} is installed: "
        f"install vllm=={WRITTEN_FOR} (scripts/install.sh) or re-check this module against the new release"
    )


class AudioInputHook:
    """Mixin for vLLM's Qwen2-Audio model: its private ``_process_audio_input`` calls ``embed_audio_features``.

    The subclass defines ``embed_audio_features(features, mel_lengths)`` (padded
    log-mel features and the real frames of each chunk -> one embedding tensor per
    chunk); other audio inputs (precomputed embeddings) keep vLLM's code.
    """

    def _process_audio_input(self, audio_input):
        if audio_input["type"] != "audio_features":
            return super()._process_audio_input(audio_input)
        features = audio_input["input_features"]
        mel_lengths = audio_input["feature_attention_mask"].sum(-1)
        with gpu_sync_allowed():  # chunks are grouped by length on the host
            return self.embed_audio_features(features, mel_lengths)


def shutdown_engine(llm) -> None:
    """Stop the processes of a ``vllm.LLM``'s engine core now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


#: vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that only logs this; in an engine built in
#: the caller's process (:class:`serve.engine.offline.OfflineEngine`), vLLM's own renderer then calls it twice
#: for every request: ~7 warnings per answer, thousands per session, burying the log's real warnings.
THREADS_REFUSED = "CPU backend doesn't allow to use `torch.set_num_threads`"


class _FirstThreadRefusalOnly(logging.Filter):
    """Lets the CPU worker's first refusal of a torch thread change through, and none after it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(THREADS_REFUSED):
            return True
        seen, self.seen = self.seen, True
        return not seen


_thread_refusals = _FirstThreadRefusalOnly()


def log_thread_refusals_once() -> None:
    """Log the CPU worker's refusal of torch thread changes once per process, not twice per request."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_thread_refusals)  # adding it again changes nothing


def apply_cpu_patches() -> None:
    """Apply both CPU speed-ups when vLLM runs on its CPU backend (idempotent)."""
    from vllm.platforms import current_platform  # resolves the platform: only once the plugin is applied

    if not current_platform.is_cpu():
        return
    limit_engine_spin()
    use_fast_cpu_lora()


# vLLM's shared-memory queue readers (engine core <-> model worker) spin on
# sched_yield() for 1 s after each read before they sleep on a wake-up socket.
# Under steady load the engine core therefore spins through every model step,
# burning a core that the model worker and the service need (on 2 cores: ~0.45
# core, a third of the service's CPU). Here a reader spins for at most
# L2GRADER_ENGINE_SPIN_S (default 0) and then sleeps on the socket. The writer
# sends a wake-up with every message, but its socket drops one when the last is
# still in flight, so the sleep is capped (1 ms while busy, 20 ms after a second
# of idleness): a lost wake-up costs at most that, never vLLM's long read timeout.
ENGINE_SPIN_S_ENV = "L2GRADER_ENGINE_SPIN_S"


def limit_engine_spin(busy_loop_s: float | None = None) -> None:
    """Make vLLM's shm queue readers sleep instead of spinning (call in every vLLM process; idempotent)."""
    if busy_loop_s is None:
        busy_loop_s = float(os.environ.get(ENGINE_SPIN_S_ENV, "0"))
    try:  # imported when applied: vLLM loads its plugins while its own modules are still importing
        from vllm.distributed.device_communicators import shm_broadcast
        from vllm.distributed.utils import sched_yield
    except ImportError:  # another vLLM layout: leave it as it is
        return
    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None or not hasattr(cls, "wait") or getattr(cls.wait, "_l2grader_spin", None) == busy_loop_s:
        return
    original = getattr(cls.wait, "_l2grader_original", cls.wait)

    def wait(self, timeout_ms: int | None = None) -> None:
        if not self.is_reader or getattr(self, "poller", None) is None:
            return original(self, timeout_ms)
        idle = time.monotonic() - self.last_read
        if idle <= busy_loop_s:
            sched_yield()
            return
        cap = 1 if idle < 1.0 else 20
        events = dict(self.poller.poll(timeout=cap if timeout_ms is None else min(timeout_ms, cap)))
        if self.local_notify_socket in events:
            import zmq  # vLLM's own dependency, loaded only where its queues run

            try:
                self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass

    wait._l2grader_spin = busy_loop_s
    wait._l2grader_original = original
    cls.wait = wait


# vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops) gather each token's adapter
# matrices into a (tokens, out, in) tensor and einsum over it: for a prefill of a
# batch of 30 s chunks (tens of thousands of tokens) that copies hundreds of MB
# per projection, a quarter of the model worker's time on the tiny checkpoint.
# The same arithmetic grouped by adapter is one matmul per adapter in the batch
# (usually one or two). Same semantics, index -1 included (it selects the last
# slot, as vLLM's indexing does). L2GRADER_FAST_CPU_LORA=0 keeps vLLM's ops.
FAST_CPU_LORA_ENV = "L2GRADER_FAST_CPU_LORA"


def _lora_products(inputs, weights, indices, dtype):
    """``einsum("bi, boi -> bo", inputs, weights[indices])`` without materialising ``weights[indices]``."""
    w = weights[:, 0] if weights.dim() == 4 else weights  # (slots, out, in)
    x = inputs.to(dtype=dtype)
    if indices.numel() == 0:
        return x.new_zeros((0, w.shape[1]))
    first = indices[0]
    if bool((indices == first).all()):
        return x @ w[first].to(dtype).T
    out = x.new_empty((x.shape[0], w.shape[1]))
    for idx in torch.unique(indices):
        rows = (indices == idx).nonzero().squeeze(1)
        out[rows] = x[rows] @ w[idx].to(dtype).T
    return out


def _bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def _bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def _bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
):
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def use_fast_cpu_lora() -> None:
    """Replace vLLM's torch (CPU) LoRA ops by adapter-grouped matmuls (call in every vLLM process; idempotent)."""
    if os.environ.get(FAST_CPU_LORA_ENV, "1") == "0":
        return
    try:  # imported when applied, as above
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:
        return
    if getattr(lora_ops, "_l2grader_fast", False):
        return
    new = {"bgmv_expand": _bgmv_expand, "bgmv_shrink": _bgmv_shrink, "bgmv_expand_slice": _bgmv_expand_slice}
    for name, fn in new.items():
        setattr(lora_ops, name, fn)  # vLLM's sgmv_* call these through the module
    for modname in ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name, fn in new.items():
            if hasattr(mod, name):
                setattr(mod, name, fn)
    lora_ops._l2grader_fast = True
