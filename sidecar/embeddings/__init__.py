"""Embedding models: which checkpoints embed (detect), the encoder module for the BERT
family (bert), the embedder the engine holds (embedder), and one request's micro-batched
work (work)."""
