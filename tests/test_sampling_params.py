"""presencePenalty, frequencyPenalty, repetitionContextSize, logitBias and cache: checked by the
schema before the engine sees them, and acted on by the engine (greedy decoding on the demo
model, so every expectation is deterministic).

The demo model talks nonsense, but greedy decoding of "The sea" settles into one token repeated
("ははは…"): the baseline the penalties are measured against. Generated token ids are not on the
wire, so outputs are compared by re-tokenizing their text (without U+FFFD, which stands for
several different byte tokens).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sidecar.client import SidecarClient
from sidecar.protocol_defs import INVALID_PARAMS

PROMPT = "The sea"


def greedy(client: SidecarClient, method: str = "generate", **params: object) -> dict:
    base = ({"prompt": PROMPT} if method == "generate"
            else {"messages": [{"role": "user", "content": PROMPT}]})
    return client.request(method, {**base, "temperature": 0, **params})


def tokens(client: SidecarClient, text: str) -> list[int]:
    return client.request("tokenize", {"text": text.replace("\ufffd", "")})["tokens"]


# ---- validation (the schema, before the engine) ------------------------------------------------

BAD_PARAMS = [
    ({"presencePenalty": 3}, ["/presencePenalty"]),
    ({"presencePenalty": -2.5}, ["/presencePenalty"]),
    ({"frequencyPenalty": 2.01}, ["/frequencyPenalty"]),
    ({"frequencyPenalty": "0.5"}, ["/frequencyPenalty"]),
    ({"repetitionContextSize": 0}, ["/repetitionContextSize"]),
    ({"repetitionContextSize": 4097}, ["/repetitionContextSize"]),
    ({"repetitionContextSize": 2.5}, ["/repetitionContextSize"]),
    ({"logitBias": {"abc": 1}}, ["/logitBias"]),
    ({"logitBias": {"-5": 1}}, ["/logitBias"]),
    ({"logitBias": {"12345678901": 1}}, ["/logitBias"]),
    ({"logitBias": {"5": 200}}, ["/logitBias/5"]),
    ({"logitBias": {"5": -100.5}}, ["/logitBias/5"]),
    ({"logitBias": {"5": "up"}}, ["/logitBias/5"]),
    ({"logitBias": [5]}, ["/logitBias"]),
    ({"logitBias": {str(i): 1 for i in range(301)}}, ["/logitBias"]),
    ({"cache": "yes"}, ["/cache"]),
    ({"cache": 0}, ["/cache"]),
    ({"presencePenalty": 3, "logitBias": {"x": 1, "7": 101}, "cache": "no"},
     ["/cache", "/logitBias", "/logitBias/7", "/presencePenalty"]),
]


def test_bad_sampling_params_are_invalid_params_pointing_at_the_field(sidecar) -> None:
    for method, base in (("generate", {"prompt": "hi"}),
                         ("chat", {"messages": [{"role": "user", "content": "hi"}]})):
        for bad, paths in BAD_PARAMS:
            response = sidecar.call(method, {**base, "maxTokens": 2, **bad})
            error = response.get("error")
            assert error is not None and error["code"] == INVALID_PARAMS, (method, bad, response)
            assert sorted(e["path"] for e in error["data"]["errors"]) == paths, (method, bad, error)
            assert all(e["message"] for e in error["data"]["errors"])
    assert sidecar.request("ping") == {}  # and the session goes on


def test_sampling_params_at_their_bounds_are_served(sidecar) -> None:
    edge = [
        {"presencePenalty": -2, "frequencyPenalty": 2, "repetitionContextSize": 1},
        {"presencePenalty": 2, "frequencyPenalty": -2, "repetitionContextSize": 4096},
        {"logitBias": {}, "cache": False},
        {"logitBias": {"0": -100, "3": 100, "007": 0.5}, "cache": True},
        {"logitBias": {str(i): 0 for i in range(300)}},  # the most entries allowed
    ]
    for method in ("generate", "chat"):
        for params in edge:
            result = greedy(sidecar, method, maxTokens=3, **params)
            assert result["finishReason"] in ("length", "stop"), (method, params)
            assert result["usage"]["cachedTokens"] >= 0


# ---- behaviour (the engine) --------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(sidecar) -> None:
    [sea] = tokens(sidecar, " sea")  # one ordinary token that decodes to visible text
    for method in ("generate", "chat"):
        forced = greedy(sidecar, method, maxTokens=8, logitBias={str(sea): 100})
        assert forced["text"].lstrip() == "sea" + " sea" * 7, (method, forced["text"])  # mlx-lm trims the first space
        assert forced["finishReason"] == "length"

    baseline = greedy(sidecar, maxTokens=32)
    [(dominant, count)] = Counter(tokens(sidecar, baseline["text"])).most_common(1)
    assert count >= 5, baseline["text"]  # the baseline repeats one token ...
    banned = greedy(sidecar, maxTokens=32, logitBias={str(dominant): -100})
    assert dominant not in tokens(sidecar, banned["text"])  # ... which a bias of -100 bans


def test_presence_penalty_stops_repeats(sidecar) -> None:
    baseline = tokens(sidecar, greedy(sidecar, maxTokens=32)["text"])
    assert len(set(baseline)) < len(baseline) // 2, baseline  # greedy alone repeats itself

    penalised = tokens(sidecar, greedy(sidecar, maxTokens=32, presencePenalty=2.0,
                                       repetitionContextSize=256)["text"])
    assert len(penalised) >= 16
    assert len(set(penalised)) == len(penalised), Counter(penalised).most_common(3)


def test_repetition_context_size_is_how_far_back_penalties_look(sidecar) -> None:
    prompt = "sea sea sea"
    near = tokens(sidecar, greedy(sidecar, prompt=prompt, maxTokens=32, presencePenalty=2.0,
                                  repetitionContextSize=20)["text"])
    far = tokens(sidecar, greedy(sidecar, prompt=prompt, maxTokens=32, presencePenalty=2.0,
                                 repetitionContextSize=256)["text"])
    assert len(set(near)) < len(near), "a token leaves a 20-token window and may come back"
    assert len(set(far)) == len(far), Counter(far).most_common(3)


def test_frequency_penalty_changes_greedy_output(sidecar) -> None:
    baseline = greedy(sidecar, maxTokens=32)["text"]
    for method_params in ({"frequencyPenalty": 1.0}, {"frequencyPenalty": 0.5, "repetitionContextSize": 64}):
        penalised = greedy(sidecar, maxTokens=32, **method_params)["text"]
        assert penalised != baseline, method_params
    # a penalty of 0 is the same as none
    assert greedy(sidecar, maxTokens=32, frequencyPenalty=0, presencePenalty=0)["text"] == baseline


def test_logit_bias_beyond_the_vocabulary_is_invalid_params(sidecar, demo_model_path: Path) -> None:
    vocabulary = json.loads((demo_model_path / "config.json").read_text())["vocab_size"]
    for method in ("generate", "chat"):
        for token in (vocabulary, 10**9):
            base = ({"prompt": PROMPT} if method == "generate"
                    else {"messages": [{"role": "user", "content": PROMPT}]})
            response = sidecar.call(method, {**base, "maxTokens": 2, "logitBias": {"5": 1, str(token): 1}})
            error = response.get("error")
            assert error is not None and error["code"] == INVALID_PARAMS, (method, token, response)
            assert [e["path"] for e in error["data"]["errors"]] == [f"/logitBias/{token}"], error
    # the last id of the vocabulary is fine, and the engine is still healthy
    assert greedy(sidecar, maxTokens=2, logitBias={str(vocabulary - 1): 1})["finishReason"] == "length"
