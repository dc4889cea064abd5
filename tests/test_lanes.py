"""Which lane a model gets, decided from the caches its architecture makes (real mlx-lm
model classes at a tiny size, random weights: no files needed)."""

from __future__ import annotations

from mlx_lm.models import llama, llama4

from sidecar.engine.registry import _caches_can_merge


def tiny_llama() -> llama.Model:
    return llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=2))


def tiny_llama4() -> llama4.Model:
    """Chunked attention: its caches cannot be merged into a batch."""
    return llama4.Model(llama4.ModelArgs(model_type="llama4", text_config={
        "attention_bias": False, "attention_chunk_size": 16, "head_dim": 8, "hidden_size": 32,
        "interleave_moe_layer_step": 1, "intermediate_size": 32, "intermediate_size_mlp": 64,
        "max_position_embeddings": 64, "model_type": "llama4_text", "num_attention_heads": 4,
        "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2,
        "num_local_experts": 2, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0,
        "use_qk_norm": False, "vocab_size": 64}))


def test_plain_attention_models_batch() -> None:
    assert _caches_can_merge(tiny_llama())


def test_chunked_attention_models_run_one_at_a_time() -> None:
    assert not _caches_can_merge(tiny_llama4())
