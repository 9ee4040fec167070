"""A tiny random Qwen2-Audio checkpoint, with demo LoRA adapters, for tests and the demo.

Nothing can be downloaded in tests or CI, so the project makes its own model:
same architecture and file layout as ``Qwen/Qwen2-Audio-7B-Instruct`` (loads in
vLLM and in transformers), about 1-2 MB, random weights, deterministic from a
seed. It is UNTRAINED: its scores mean nothing. It exercises every code path
(tokenizer, audio processor, encoder, projector, language model, LoRA) at a
size a 2-core machine runs in milliseconds.

Shapes that matter for vLLM's CPU backend: the attention head size is 64 (the
CPU kernels refuse 16), the audio encoder keeps the real 128 mel bins and 1500
positions (30 s windows, 25 audio tokens per second).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve.engine.weight_names import published_name
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.prompt import QUESTION, build_prompt

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# The demo parts: an interview answer and a long turn, as in a Speak & Improve style test.
DEMO_PARTS: dict[str, str] = {
    "interview": "Part 1, interview: the candidate answers a short question about themselves (10-20 seconds).",
    "long_turn": "Part 3, long turn: the candidate speaks for about a minute on a given topic.",
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'audio' %}Audio {{ loop.index }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head size 64: vLLM's CPU attention refuses 16
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
TINY_AUDIO = dict(
    model_type="qwen2_audio_encoder",
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=128,
    num_mel_bins=128,
    max_source_positions=1500,
)
TOKENIZER_VOCAB = 600


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the prompts it will see, so they stay short."""
    texts = [build_prompt(task, DEFAULT_LEVELS) for task in DEMO_PARTS.values()]
    texts += [QUESTION, " ".join(lv.label for lv in DEFAULT_LEVELS)]
    texts += ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today?"]
    return texts


def _write_tokenizer_and_processor(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([SPECIAL_TOKENS[0]], special_tokens=True)
    feature_extractor = WhisperFeatureExtractor(feature_size=128)
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)


def _build_model(out: Path, seed: int):
    from transformers import AutoTokenizer, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Qwen2AudioConfig(
        audio_config=TINY_AUDIO,
        text_config=dict(TINY_TEXT, vocab_size=len(tokenizer)),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    # Random init with the model's own std is too timid for a 2-layer model: the
    # label distribution would be flat whatever the audio. Widen the weights so
    # the untrained model's outputs depend visibly on its input.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_positions" not in name:
                p.normal_(0.0, 0.08)
    return model, config


def _save_checkpoint(model, config, out: Path) -> None:
    state = {published_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)


def make_demo_adapter(model, out: Path, part: str, seed: int, rank: int = 16) -> Path:
    """A LoRA adapter with random non-zero weights, saved by peft as training would save it."""
    from peft import LoraConfig, get_peft_model

    from serve.grading.adapter_files import LANGUAGE_MODEL_TARGETS, write_adapter_metadata

    lora_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_TARGETS, bias="none"
    )
    peft_model = get_peft_model(copy.deepcopy(model), lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    peft_model.save_pretrained(out)
    write_adapter_metadata(out, part=part, levels=DEFAULT_LEVELS, training={"kind": "demo-random", "seed": seed})
    return out


def demo_parts(n: int = len(DEMO_PARTS)) -> dict[str, str]:
    """``n`` demo parts, part id -> task: the :data:`DEMO_PARTS` first, then ``part_3``, ``part_4``, ..."""
    if n < 1:
        raise ValueError(f"at least one demo part is needed, not {n}")
    parts = dict(list(DEMO_PARTS.items())[:n])
    for i in range(len(parts) + 1, n + 1):
        parts[f"part_{i}"] = f"Demo part {i}: the candidate speaks for about a minute on a given topic."
    return parts


def demo_config_dict(model_dir: str, adapter_dirs: dict[str, str], parts: dict[str, str] | None = None) -> dict:
    """The serving config for the tiny checkpoint and its demo parts (paths as given; default :data:`DEMO_PARTS`)."""
    return {
        "model": {
            "base": model_dir,
            "untrained": True,
        },
        "engine": {
            "dtype": "float32",
            "max_lora_rank": 16,
            "max_loras": 2,
            "max_cpu_loras": 8,
            "memory_share": 0.1,
            "max_num_seqs": 64,
            # The interview's prompt holds its four aspects' rubrics: about 1,500 tokens of this tiny tokenizer
            # (a real one makes about 900 of them), plus up to 750 audio tokens.
            "max_model_len": 4096,
            # On CPU vLLM's KV blocks hold 128 tokens by default; the prefix cache reuses whole blocks only, so an
            # aspect's request recomputes up to a block of the audio: smaller blocks make aspects cheaper.
            "kv_block_size": 32,
        },
        # One ingress replica: on a small CPU-only machine a second one competes with the engine
        # for cores (measured on 2 cores: 20.6 -> 22.3 answers/s, 27.9 -> 21.3 ms extra CPU per answer).
        "serving": {
            "ingress": {
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
                "max_ongoing_requests": 64,
                "num_cpus": 1,
            },
        },
        "parts": {
            part: {
                "adapter": adapter_dirs[part],
                "task": task,
                **demo_aspects(part, adapter_dirs),
                "review": dict(DEMO_DURATIONS.get(part, DEMO_DURATIONS["long_turn"])),
            }
            for part, task in (parts or DEMO_PARTS).items()
        },
    }


#: Each demo part's expected answer length (review reasons too_short and too_long), around its task's wording and
#: wide enough for the repository's sample answer (docs/sample-answer.wav, 6 s, scored as an interview answer); the
#: extra parts speak "for about a minute", as the long turn.
DEMO_DURATIONS = {
    "interview": {"min_duration_s": 1.5, "max_duration_s": 60.0},  # the sample is 6 s, synth-data answers 2-6 s
    "long_turn": {"min_duration_s": 15.0, "max_duration_s": 120.0},  # asked for about a minute
}


#: The demo's analytic aspects: the interview's four, scored by the part's adapter; the long turn's coherence, by an
#: adapter of its own (``adapters/long_turn.coherence``).
DEMO_ASPECTS = {
    "interview": {"fluency": None, "pronunciation": None, "language_use": None, "coherence": None},
    "long_turn": {"coherence": "long_turn.coherence"},
}


def demo_aspects(part: str, adapter_dirs: dict[str, str]) -> dict:
    """The ``aspects`` entry of a demo part's config (empty for parts without aspects)."""
    aspects = DEMO_ASPECTS.get(part)
    if not aspects:
        return {}
    return {"aspects": {a: {} if own is None else {"adapter": adapter_dirs[own]} for a, own in aspects.items()}}


def make_tiny_model(out_dir: str | Path, seed: int = 0, parts: int = len(DEMO_PARTS)) -> Path:
    """Write the tiny checkpoint, a demo adapter for each of ``parts`` demo parts and ``demo.yaml`` into ``out_dir``."""
    import yaml

    part_tasks = demo_parts(parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    _write_tokenizer_and_processor(model_dir)
    model, config = _build_model(model_dir, seed)
    _save_checkpoint(model, config, model_dir)
    (model_dir / "UNTRAINED.txt").write_text(
        f"Random weights (seed {seed}) made by `l2grader make-tiny-model`. Scores from this model mean nothing.\n"
    )
    adapter_dirs = {}
    own = [(part, name) for part in part_tasks for name in DEMO_ASPECTS.get(part, {}).values() if name is not None]
    for i, (part, name) in enumerate([(p, p) for p in part_tasks] + own):
        make_demo_adapter(model, out / "adapters" / name, part, seed=seed * 1000 + i + 1)
        adapter_dirs[name] = f"adapters/{name}"
    cfg = demo_config_dict("model", adapter_dirs, part_tasks)
    header = "# Demo config for the tiny UNTRAINED checkpoint (random weights): scores mean nothing.\n"
    (out / "demo.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return out
