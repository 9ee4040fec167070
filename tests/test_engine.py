"""The real vLLM engine on the tiny checkpoint, checked against the transformers + peft reference.

Tolerance: float32 on both sides; label probabilities, label mass and scores
agree to 1e-4 (observed differences are around 1e-6, from kernel summation order).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file, save_file

from serve.grading.audio import SAMPLE_RATE, PreparedAnswer, split
from serve.grading.config import load_config
from serve.grading.quality import measure
from tests.audio_fixtures import speechlike
from tests.engine_process import config_engine, engine_process

pytestmark = pytest.mark.engine
TOL = 1e-4


def to_transformers4_names(src, dst):
    """Rewrite a transformers-5 peft adapter with the key names transformers 4 used."""
    shutil.copytree(src, dst)
    weights = load_file(src / "adapter_model.safetensors")
    renamed = {
        k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
        for k, v in weights.items()
    }
    assert renamed.keys() != weights.keys()
    save_file(renamed, dst / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def cfg_path(tiny_dir, tiny_config, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_cfg")
    to_transformers4_names(tiny_dir / "adapters" / "interview", d / "interview_t4")
    raw = tiny_config()
    raw["parts"]["base"] = {"adapter": None, "task": raw["parts"]["interview"]["task"]}
    raw["parts"]["interview_t4"] = {**raw["parts"]["interview"], "adapter": str(d / "interview_t4")}  # its prompt
    (d / "c.yaml").write_text(yaml.safe_dump(raw))
    return d / "c.yaml"


@pytest.fixture(scope="module")
def cfg(cfg_path):
    return load_config(cfg_path)


@pytest.fixture(scope="module")
def vllm_scorer(cfg_path):
    """The offline engine (``vllm.LLM``) in a process of its own: it changes process-wide state for good."""
    with engine_process(config_engine, cfg_path) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(cfg):
    from adapters.reference import ReferenceScorer

    return ReferenceScorer(cfg)


WAVES = [speechlike(6, seed=11), speechlike(20, seed=12), speechlike(75, seed=13)]


def scored_waves(engine, part, waves):
    """Score already-decoded 16 kHz answers of one part, chunked as in serving (in the engine's process)."""
    return engine.score_answers([(part, PreparedAnswer(split(w), measure(w, SAMPLE_RATE, -50.0))) for w in waves])


def score_waves(vllm_scorer, part, waves):
    return vllm_scorer.call(scored_waves, part, waves)


@pytest.mark.parametrize("part", ["base", "interview", "long_turn"])
def test_vllm_equals_transformers_reference(vllm_scorer, reference, cfg, part):
    got = score_waves(vllm_scorer, part, WAVES)
    for wave, answer in zip(WAVES, got):
        ref = reference.score_answer(part, split(wave))
        assert len(answer.chunks) == len(ref.chunks)
        assert answer.score == pytest.approx(ref.score, abs=TOL)
        for label, p in ref.probabilities.items():
            assert answer.probabilities[label] == pytest.approx(p, abs=TOL)
        assert 0 < answer.label_mass < 1  # full-vocabulary probabilities: the rest of the vocabulary holds some
        assert answer.label_mass == pytest.approx(ref.label_mass, abs=TOL)
        assert answer.uncertainty.label_mass == answer.label_mass
        for key in ("score_sd", "entropy", "chunk_spread"):
            assert getattr(answer.uncertainty, key) == pytest.approx(getattr(ref.uncertainty, key), abs=TOL)
        for a, b in zip(answer.chunks, ref.chunks):
            assert a.score == pytest.approx(b.score, abs=TOL)
            assert a.label_mass == pytest.approx(b.label_mass, abs=TOL)
        # Each aspect, chunked answers included, as the reference scores it with the aspect's prompt and adapter.
        assert answer.aspects.keys() == ref.aspects.keys() == cfg.parts[part].aspects.keys()
        for name, want in ref.aspects.items():
            got = answer.aspects[name]
            assert got.probabilities == pytest.approx(want.probabilities, abs=TOL)
            assert got.label_mass == pytest.approx(want.label_mass, abs=TOL)
            assert got.score == pytest.approx(want.score, abs=TOL)
            assert got.uncertainty.chunk_spread == pytest.approx(want.uncertainty.chunk_spread, abs=TOL)
            assert got.adapter == want.adapter


def test_adapters_change_the_distribution(vllm_scorer):
    base, interview, long_turn = (score_waves(vllm_scorer, p, WAVES[:1])[0] for p in ("base", "interview", "long_turn"))
    dist = lambda a, b: max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)  # noqa: E731
    assert dist(base, interview) > 0.01
    assert dist(base, long_turn) > 0.01
    assert dist(interview, long_turn) > 0.01


def test_aspects_read_their_own_labels_and_adapters(vllm_scorer):
    interview, long_turn = (score_waves(vllm_scorer, p, WAVES[:1])[0] for p in ("interview", "long_turn"))
    assert set(interview.aspects) == {"fluency", "pronunciation", "language_use", "coherence"}
    dist = lambda a, b: max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)  # noqa: E731
    for name, aspect in interview.aspects.items():
        assert dist(aspect, interview) > 1e-3, name  # its own question, not the holistic one
        assert aspect.adapter == interview.model.adapter  # the part's adapter
    assert dist(interview.aspects["fluency"], interview.aspects["coherence"]) > 1e-3
    own = long_turn.aspects["coherence"].adapter
    assert own.startswith("long_turn.coherence@") and own != long_turn.model.adapter


def holistic_prefix_use(engine) -> dict:
    """In the engine's process: the interview's targets for one new chunk in one ``generate`` call; what each
    request found in the prefix cache, and the token counts of the prompt's shared parts."""
    from serve.engine.requests import engine_input, lora_request, sampling_params

    spec = engine.parts["interview"]
    chunk = split(speechlike(12, seed=99))[0]  # audio no earlier request had
    targets = spec.targets
    outs = engine.llm.generate(
        [engine_input(t, chunk) for t in targets],
        [sampling_params(t) for t in targets],
        lora_request=[lora_request(t) for t in targets],
        use_tqdm=False,
    )
    tokenizer = engine.llm.get_tokenizer()
    prefix, _ = spec.prompt.split("<|audio_eos|>")
    audio_tokens = len(outs[0].prompt_token_ids) - len(tokenizer.encode(spec.prompt, add_special_tokens=False)) + 1
    return {
        "targets_share_the_prefix": all(t.prompt.startswith(prefix + "<|audio_eos|>") for t in targets),
        "shared": len(tokenizer.encode(prefix, add_special_tokens=False)) + audio_tokens,
        "before_audio": len(tokenizer.encode(spec.prompt.split("<|AUDIO|>")[0], add_special_tokens=False)),
        "requests": [(len(out.prompt_token_ids), out.num_cached_tokens or 0) for out in outs],
    }


def test_aspects_reuse_the_holistic_prefix(vllm_scorer):
    """The aspects' requests of a chunk find the rubric and the audio in vLLM's prefix cache: each prefills only
    its question (the part's adapter scores them, so the cache key is the same)."""
    use = vllm_scorer.call(holistic_prefix_use)
    assert use["targets_share_the_prefix"]
    shared = use["shared"]
    block = 128  # vLLM's KV-cache block on CPU: only whole blocks are cached
    (_, first_cached), *others = use["requests"]
    assert first_cached <= use["before_audio"]  # the rubric only: this audio is new
    for prompt_tokens, cached in others:
        assert cached >= shared // block * block > 0
        question = prompt_tokens - shared
        assert prompt_tokens - cached < question + block  # prefilled: its question


def test_transformers4_adapter_names_apply_the_same_weights(vllm_scorer):
    new, old = (score_waves(vllm_scorer, p, WAVES[:2]) for p in ("interview", "interview_t4"))
    for a, b in zip(new, old):
        assert a.probabilities == pytest.approx(b.probabilities, abs=TOL)
    assert old[0].model.adapter.startswith("interview_t4@")


def test_scores_are_well_formed_and_repeatable(vllm_scorer):
    first = score_waves(vllm_scorer, "interview", WAVES)
    again = score_waves(vllm_scorer, "interview", WAVES[::-1])[::-1]
    for a, b in zip(first, again):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert sum(a.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert 1.0 <= a.score <= 6.0
        assert a.hard_score in {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}
        assert a.model.untrained and a.model.adapter_hash
    assert [len(a.chunks) for a in first] == [1, 1, 3]
    chunk_scores = np.array([c.score for c in first[2].chunks])
    assert first[2].score == pytest.approx(chunk_scores.mean(), abs=1e-9)  # equal-length chunks


def thread_refusals_while_scoring(engine, waves) -> tuple[int, list[str]]:
    """In the engine's process: answers scored, and the refusals of torch thread changes vLLM logged meanwhile."""
    import logging

    from serve.engine.vllm_private import THREADS_REFUSED

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("vllm")
    logger.addHandler(handler)
    try:
        scored = len(scored_waves(engine, "interview", waves))
    finally:
        logger.removeHandler(handler)
    return scored, [m for m in seen if m.startswith(THREADS_REFUSED)]


def test_the_cpu_workers_thread_refusal_is_logged_once_not_per_request(vllm_scorer):
    """The engine runs in its caller's process: vLLM's CPU worker refuses torch thread changes (with a warning)
    and vLLM's renderer asks for one twice per request."""
    scored, refusals = vllm_scorer.call(thread_refusals_while_scoring, WAVES[:2])
    assert scored == 2
    assert not refusals


def contract_against_batch(engine, part: str, waves) -> tuple[bool, list[float], list[float]]:
    """In the engine's process: whether it is a contract engine, and the scores of one answer and a batch through
    the contract's methods beside those of the offline batch."""
    import asyncio

    from serve.engine.contract import Engine
    from serve.grading.parts import config_parts

    spec = engine.check(config_parts(engine.cfg)[part])
    answers = [PreparedAnswer(split(w), measure(w, SAMPLE_RATE, -50.0)) for w in waves]
    want = engine.score_answers([(part, a) for a in answers])

    async def run():
        await engine.check_health()
        await engine.load_adapter(spec)
        one = await engine.score_answer(spec, answers[0], "one")
        batch = await engine.score_batch([(spec, a) for a in answers], "batch")
        await engine.unload_adapter(spec)
        return [one, *batch]

    got = asyncio.run(run())
    return isinstance(engine, Engine), [g.score for g in got], [w.score for w in [want[0], *want]]


def test_the_offline_engine_keeps_the_contract(vllm_scorer):
    """The contract's methods (serve.engine.contract.Engine) give what the offline batch gives: checked parts,
    adapters loaded ahead, one answer or a batch scored alike."""
    is_engine, got, want = vllm_scorer.call(contract_against_batch, "interview", WAVES[:2])
    assert is_engine
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert abs(g - w) < TOL
