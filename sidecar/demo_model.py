"""Build the embedded default ("demo") model, deterministically and offline.

The demo model is a tiny but real mlx-lm ``llama`` checkpoint with random
weights and a byte-level BPE tokenizer trained on ``demo_corpus.txt``.  It
talks nonsense, but it exercises everything a real model does: loading via
``mlx_lm.load``, ChatML chat templates, EOS handling, streaming
detokenization of tokens that split multi-byte UTF-8 characters.

The output is a pure function of this file and the corpus: the BPE trainer
and the safetensors writer live here (so it does not drift with library
versions), and weights come from numpy's ``default_rng``, which is
platform independent unlike ``mx.random``.  Building needs only numpy and
``tokenizers`` (for its pre-tokenizer) and takes well under a second.

The architecture's size is a ``ModelShape``: ``DEMO_SHAPE`` is the embedded
model; ``scripts/bench.py`` builds a larger one the same way.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import shutil
import struct
import tempfile
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


log = logging.getLogger(__name__)

DEMO_MODEL_ALIAS = "demo"
DEMO_MODEL_DIRNAME = "localmlx-demo"

# Bump whenever the output of the build changes; older builds then count as
# incomplete and are rebuilt by ensure_demo_model().
BUILD_VERSION = 2  # 2: 32768 positions (was 2048), room for an agent's prompt
MARKER_FILE = "localmlx_demo.json"

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")
SEED = 20240917

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2


@dataclass(frozen=True)
class ModelShape:
    """The architecture's size.  Every shape shares the corpus, the tokenizer
    recipe and the seed; only the demo's own shape is the embedded model."""

    vocab_size: int = 1024  # the BPE's target size
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    # RoPE has no position table: a long context costs no weights, only the KV cache a long
    # prompt actually fills. 32768 fits an agent's prompt (Wooster's code agent sends ~7,000 tokens).
    max_positions: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


DEMO_SHAPE = ModelShape()

# ChatML.  Content may also be a list of OpenAI-style parts; text parts are
# concatenated so that such requests render instead of failing.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is not none %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    MARKER_FILE,
)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def is_complete(path: Path, shape: ModelShape = DEMO_SHAPE) -> bool:
    """True if ``path`` holds a finished model of the current version and of
    ``shape`` (by default the demo model)."""
    path = Path(path)
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker == marker_contents(shape)


def ensure_demo_model(models_dir: Path) -> Path:
    """Return ``models_dir/DEMO_MODEL_DIRNAME``, building it if needed."""
    return build_demo_model(Path(models_dir) / DEMO_MODEL_DIRNAME)


def build_demo_model(dest: Path, shape: ModelShape = DEMO_SHAPE) -> Path:
    """Build the demo model (or a model of another ``shape``, made the same
    way) at ``dest``, unchanged if already complete.

    Files are written to a temporary sibling directory that is renamed into
    place, so ``dest`` is never half-written and concurrent builders are
    safe: whoever renames first wins, the others discard their copy.
    """
    dest = Path(dest)
    if is_complete(dest, shape):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not secret
        log.info("building demo model in %s", dest)
        write_model_files(tmp, shape)
        _install(tmp, dest, shape)
    finally:
        # Gone after a successful rename; otherwise our losing/broken copy.
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------
# Atomic install
# --------------------------------------------------------------------------


def _install(tmp: Path, dest: Path, shape: ModelShape) -> None:
    """Rename the finished ``tmp`` onto ``dest``, racing other builders."""
    for _ in range(10):
        try:
            # Atomic; succeeds if dest is missing or an empty directory.
            os.rename(tmp, dest)
            return
        except OSError:
            if is_complete(dest, shape):
                return  # another process won the race; tmp gets discarded
        # dest is stale or broken: move it aside (atomically) and retry.
        aside = dest.parent / f".{dest.name}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(dest, aside)
        except FileNotFoundError:
            continue  # someone else moved it already
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not install demo model at {dest}")


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def marker_contents(shape: ModelShape = DEMO_SHAPE) -> dict[str, Any]:
    """What the marker file says; the demo's own shape is implied, others are
    spelled out so that a model of another shape never passes for it."""
    marker = {"build_version": BUILD_VERSION, "alias": DEMO_MODEL_ALIAS, "seed": SEED}
    if shape != DEMO_SHAPE:
        marker["shape"] = asdict(shape)
    return marker


def write_model_files(out: Path, shape: ModelShape = DEMO_SHAPE) -> None:
    """Write every file of the checkpoint into the existing directory ``out``."""
    vocab, merges = train_bpe(CORPUS_PATH.read_text(encoding="utf-8"), shape.vocab_size)
    im_end_id = vocab[IM_END]
    _write_json(out / "tokenizer.json", tokenizer_json(vocab, merges))
    _write_json(out / "tokenizer_config.json", tokenizer_config(shape))
    _write_json(out / "special_tokens_map.json", special_tokens_map())
    _write_json(out / "config.json", model_config(len(vocab), im_end_id, shape))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": im_end_id, "do_sample": False},
    )
    _write_safetensors(
        out / "model.safetensors",
        random_weights(len(vocab), quiet_token_ids(vocab), shape),
    )
    # Written last: its presence (plus the others) means "complete".
    _write_json(out / MARKER_FILE, marker_contents(shape))


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    # fsync so that a crash right after the rename cannot leave empty files.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by ByteLevel BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _pretokenize(text: str) -> list[str]:
    """Split and byte-map text exactly as the runtime ByteLevel pre-tokenizer."""
    from tokenizers import pre_tokenizers  # on use: the sidecar imports this module at start-up

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


Pair = tuple[str, str]


def train_bpe(text: str, vocab_size: int) -> tuple[dict[str, int], list[Pair]]:
    """Train byte-level BPE; returns (vocab, merges).

    Our own trainer rather than ``tokenizers.trainers.BpeTrainer`` so the
    result cannot drift between library versions.  Ties between equally
    frequent pairs are broken lexicographically, making it deterministic.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)

    word_counts = Counter(_pretokenize(text))
    words = [list(w) for w in sorted(word_counts)]  # symbols of each word
    counts = [word_counts[w] for w in sorted(word_counts)]

    pair_counts: Counter[Pair] = Counter()
    pair_words: dict[Pair, set[int]] = {}  # which words contain a pair
    for wi, syms in enumerate(words):
        for pair in itertools.pairwise(syms):
            pair_counts[pair] += counts[wi]
            pair_words.setdefault(pair, set()).add(wi)

    # Max-heap on count with lazy invalidation: stale entries are skipped.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue
        if -neg < 2:
            break  # nothing left that occurs more than once
        merged = pair[0] + pair[1]
        merges.append(pair)
        # Two merges can spell the same string ("a"+"bc", "ab"+"c"): one id.
        vocab.setdefault(merged, len(vocab))
        touched: set[Pair] = set()
        for wi in sorted(pair_words.pop(pair, ())):
            touched |= _merge_word(
                wi, words, counts[wi], pair, merged, pair_counts, pair_words
            )
        pair_counts.pop(pair, None)
        for p in sorted(touched):
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab, merges


def _merge_word(wi: int, words: list[list[str]], count: int, pair: Pair, merged: str,
                pair_counts: Counter[Pair], pair_words: dict[Pair, set[int]]) -> set[Pair]:
    """Apply one merge to word ``wi``, updating pair statistics; returns the
    set of pairs whose counts changed."""
    syms = words[wi]
    old_pairs = list(itertools.pairwise(syms))
    new, i = [], 0
    while i < len(syms):
        if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
            new.append(merged)
            i += 2
        else:
            new.append(syms[i])
            i += 1
    new_pairs = list(itertools.pairwise(new))
    words[wi] = new
    for p in old_pairs:
        pair_counts[p] -= count
    for p in new_pairs:
        pair_counts[p] += count
        pair_words.setdefault(p, set()).add(wi)
    return set(old_pairs) | set(new_pairs)


def tokenizer_json(vocab: dict[str, int], merges: list[Pair]) -> dict[str, Any]:
    """The ``tokenizers`` serialization of a GPT-2 style byte-level BPE."""
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[tok],
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for tok in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            # "a b" strings: byte-level symbols never contain a space, and
            # every tokenizers version reads this form.
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def tokenizer_config(shape: ModelShape = DEMO_SHAPE) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": shape.max_positions,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def model_config(
    vocab_size: int, eos_token_id: int, shape: ModelShape = DEMO_SHAPE
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": shape.max_positions,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def quiet_token_ids(vocab: dict[str, int]) -> list[int]:
    """Tokens the model should (almost) never emit: the specials, so that
    generations run to max_tokens, and bytes that are never useful output
    (ASCII control characters, bytes invalid anywhere in UTF-8)."""
    byte_char = bytes_to_unicode()
    junk = [b for b in range(256) if (b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F]
    junk += [0xC0, 0xC1, *range(0xF5, 0x100)]
    return [vocab[t] for t in SPECIAL_TOKENS] + [vocab[byte_char[b]] for b in junk]


def random_weights(
    vocab_size: int, quiet_ids: list[int], shape: ModelShape = DEMO_SHAPE
) -> dict[str, np.ndarray]:
    """Seeded float32 weights under mlx-lm llama parameter names.

    float32 because mlx's CPU backend decodes it about twice as fast as
    float16.  Embeddings use std 0.02; projections use 1/sqrt(fan_in) so the
    random network is lively enough for greedy output to wander rather than
    lock onto one token.  Quiet rows are shrunk towards zero: with tied
    embeddings their logits stay near 0 while the best ordinary token scores
    well above it, so greedy decoding never picks them (sampling rarely).
    """
    import numpy as np  # here, not at the top: the sidecar imports this module at start-up

    rng = np.random.default_rng(SEED)
    hidden, inter = shape.hidden_size, shape.intermediate_size

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return normal((out_dim, in_dim), in_dim**-0.5)

    emb = normal((vocab_size, hidden), 0.02)
    emb[quiet_ids] *= np.float32(0.01)
    weights = {"model.embed_tokens.weight": emb}
    ones = np.ones(hidden, dtype=np.float32)
    q_dim = shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = ones
        weights[p + "self_attn.q_proj.weight"] = linear(q_dim, hidden)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_dim, hidden)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, q_dim)
        weights[p + "post_attention_layernorm.weight"] = ones
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    weights["model.norm.weight"] = ones
    return weights


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Minimal safetensors writer (sorted keys, little-endian, 8-byte aligned
    header) so the file bytes do not depend on any library version."""
    import numpy as np  # on use, as above

    dtypes = {("f", 2): "F16", ("f", 4): "F32"}
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = tensors[name]
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": dtypes[(arr.dtype.kind, arr.dtype.itemsize)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    _write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))
