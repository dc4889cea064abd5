"""The fewest tokens a text can take, judged by its length alone: a prompt far longer than its
model's context is refused before it is tokenized (tokenizing 15 MiB of text takes seconds
and about 1.5 GiB, for a prompt that could never run).

One token stands for at most `most_bytes_per_token` bytes of text, so a text of n bytes takes
at least n / that many tokens. That holds for tokenizers that keep every byte of the text in
some token: byte-level BPEs (GPT-2, Llama 3, Qwen) and BPEs with byte fallback (Llama 2,
Mistral, Gemma), behind normalizers that shrink text by Unicode normalization at most. A
tokenizer that may drop text (whitespace splitting, stripping, WordPiece's unknown words,
fused unknowns, anything not known here) gets no bound: its prompts are tokenized whole, as
before.
"""

from __future__ import annotations

import json
from typing import Any

# Unicode normalization (NFC, NFKC, ...) and lower-casing never map a character, or a sequence
# of them, to fewer than a quarter of its UTF-8 bytes (𝐀, 4 bytes, is "A" in NFKC; Hangul jamo
# compose 9 bytes into 3); ASCII text they leave as it is. Checked over all of Unicode in
# tests/test_length_bound.py.
SHRINK = 4
_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}


def most_bytes_per_token(tokenizer: Any) -> tuple[int, int] | None:
    """(bytes for ASCII text, bytes for any text) that one token can stand for at most, or
    None when this tokenizer may drop text (then no length says how many tokens it takes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # not a Hugging Face fast tokenizer: nothing known about it
        return None
    try:
        pre = _state(backend.pre_tokenizer)
        normalizer = _state(backend.normalizer)
        model = backend.model
        vocab = backend.get_vocab(with_added_tokens=False)
        added = [token.content for token in backend.get_added_tokens_decoder().values()]
    except Exception:  # an older or unusual tokenizers build: no bound rather than a wrong one
        return None
    byte_level = "ByteLevel" in _types(pre)
    if not _keeps_text(pre) or type(model).__name__ != "BPE":
        return None
    shrink = _shrink(normalizer)
    if shrink is None:
        return None
    longest = max((len(t) if byte_level else len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)
    if byte_level or model.byte_fallback:
        if not _has_every_byte(vocab, byte_level):
            return None
    elif model.unk_token is None or model.fuse_unk:  # unknown characters vanish, or many make one token
        return None
    else:
        longest = max(longest, 4)  # one unknown character: at most 4 bytes
    longest = max([longest, *(len(t.encode("utf-8", "surrogatepass")) for t in added)])
    return longest, longest * shrink


def fewest_tokens(text: str, per_token: tuple[int, int]) -> int:
    """The fewest tokens `text` can take, for `per_token` from `most_bytes_per_token`. Cheap:
    an ASCII text's length is its size in bytes, and it is not copied."""
    if text.isascii():
        return -(-len(text) // per_token[0])
    return -(-len(text.encode("utf-8", "surrogatepass")) // per_token[1])


def _state(component: Any) -> Any:
    return None if component is None else json.loads(component.__getstate__())


def _types(component: Any) -> list[str]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers") or component.get("normalizers") or []
        return [name for part in parts for name in _types(part)]
    return [component.get("type")]


def _parts(component: Any) -> list[dict[str, Any]]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [leaf for part in component.get("pretokenizers") or component.get("normalizers") or []
                for leaf in _parts(part)]
    return [component]


def _keeps_text(pre: Any) -> bool:
    """Every pre-tokenizer step splits text (or respells it), none removes any."""
    return all(part.get("type") in _KEEPING_PRE_TOKENIZERS and part.get("behavior") not in ("Removed", "removed")
               for part in _parts(pre))


def _shrink(normalizer: Any) -> int | None:
    """How much the normalizers may shrink a non-ASCII text at most; None: unbounded or unknown."""
    shrink = 1
    for part in _parts(normalizer):
        kind = part.get("type")
        if kind in _UNICODE_FORMS:
            shrink *= SHRINK
        elif kind == "Prepend":
            continue
        elif kind == "Replace" and "String" in (part.get("pattern") or {}):
            pattern, content = part["pattern"]["String"].encode(), str(part.get("content", "")).encode()
            if not content or len(content) < len(pattern):
                return None
        else:
            return None
    return shrink


def _has_every_byte(vocab: dict[str, int], byte_level: bool) -> bool:
    """Each of the 256 bytes has a token of its own, so no byte is ever unknown."""
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel  # on use: the engine imports this module at start-up

        return all(char in vocab for char in ByteLevel.alphabet())
    return all(f"<0x{b:02X}>" in vocab for b in range(256))
