"""Text as requests carry it, made fit for a tokenizer (shared by generation and embeddings)."""

from __future__ import annotations


def clean_text(text: str) -> str:
    """Lone surrogates (legal in JSON, not in UTF-8) become U+FFFD before tokenizing."""
    if text.isascii():  # no surrogates: not copied
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
