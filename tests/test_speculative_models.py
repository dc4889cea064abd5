"""The identical-logits pair of tests/speculative_models.py: the target is the draft plus layers
that add nothing, so both give the same logits while the target has more to compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.distributed_models import parameter_count
from tests.speculative_models import PAIR_MARKER, build_copying_model, build_speculative_pair, copying_name, pair_names

PROMPT = "The sea and the mountains were old friends, and every morning they"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_speculative_pair(tmp_path_factory.mktemp("spec-models"))


@pytest.fixture(scope="module")
def loaded(pair: tuple[Path, Path]) -> tuple[Any, Any, Any]:
    from mlx_lm import load

    draft, tokenizer = load(str(pair[0]))[:2]
    target = load(str(pair[1]))[0]
    return draft, target, tokenizer


def test_named_and_cached_by_content(pair: tuple[Path, Path]) -> None:
    assert tuple(p.name for p in pair) == pair_names("tiny")
    stamps = [(p / "model.safetensors").stat().st_mtime_ns for p in pair]
    assert build_speculative_pair(pair[0].parent) == pair
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in pair] == stamps  # not rebuilt
    roles = [json.loads((p / PAIR_MARKER).read_text())["role"] for p in pair]
    assert roles == ["draft", "target"]


def test_target_is_the_draft_plus_layers(pair: tuple[Path, Path]) -> None:
    draft, target = (json.loads((p / "config.json").read_text()) for p in pair)
    assert draft["model_type"] == target["model_type"] == "llama"
    assert (draft["num_hidden_layers"], target["num_hidden_layers"]) == (2, 8)
    assert parameter_count(pair[1]) > 2 * parameter_count(pair[0])  # 4x the layers, the same embedding
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (pair[0] / name).read_bytes() == (pair[1] / name).read_bytes()


def test_same_logits_for_a_random_prompt(loaded: tuple[Any, Any, Any]) -> None:
    import mlx.core as mx
    import numpy as np

    draft, target, tokenizer = loaded
    ids = np.random.default_rng(7).integers(3, tokenizer.vocab_size, size=(2, 40))
    prompt = mx.array(ids)
    assert mx.allclose(draft(prompt), target(prompt), atol=1e-5).item()


def test_same_greedy_tokens(loaded: tuple[Any, Any, Any]) -> None:
    from mlx_lm import generate

    draft, target, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    texts = [generate(model, tokenizer, prompt, max_tokens=48) for model in (draft, target)]
    assert texts[0] == texts[1]
    assert len(tokenizer.encode(texts[0])) > 20  # a real continuation, not an early stop


def test_mlx_lm_accepts_every_drafted_token(loaded: tuple[Any, Any, Any]) -> None:
    """What the pair is for: mlx-lm's speculative decoding with it gives the target's tokens and
    accepts every draft (k drafted per step of k+1 tokens)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    draft, target, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=40, sampler=make_sampler(0.0))]
    steps = list(stream_generate(target, tokenizer, prompt, max_tokens=40, sampler=make_sampler(0.0),
                                 draft_model=draft, num_draft_tokens=3))
    assert [r.token for r in steps] == plain
    assert sum(r.from_draft for r in steps) == 30  # 3 of every 4 (the 40th token is the 10th step's last)


@pytest.fixture(scope="module")
def copying(pair: tuple[Path, Path]) -> tuple[Any, Any]:
    from mlx_lm import load

    path = build_copying_model(pair[0].parent, size="tiny")
    assert path.name == copying_name("tiny")
    model, tokenizer = load(str(path))[:2]
    return model, tokenizer


def test_copying_model_logits_depend_on_the_token_alone(copying: tuple[Any, Any]) -> None:
    import mlx.core as mx
    import numpy as np

    model, tokenizer = copying
    ids = mx.array(np.random.default_rng(11).integers(3, tokenizer.vocab_size, size=(1, 40)))
    in_context = model(ids)[0]
    alone = model(ids.reshape(40, 1))[:, 0]
    assert mx.allclose(in_context, alone, atol=1e-5).item()


def test_copying_model_continues_the_cycle_its_prompt_holds(copying: tuple[Any, Any]) -> None:
    """Greedy output soon repeats a cycle; given it, the continuation copies the prompt."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = copying

    def greedy(prompt: list[int], n: int) -> list[int]:
        return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0))]

    seed = tokenizer.encode(PROMPT)
    out = greedy(seed, 160)
    period = next(p for p in range(1, 40) if out[-3 * p:] == out[-p:] * 3)
    assert greedy(seed + out, 2 * period) == out[-period:] * 2
