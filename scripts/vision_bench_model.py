"""Random Qwen2-VL checkpoints for `scripts/bench.py --vision`, at a chosen size.

`tiny` is the test model itself (tests/vision_models.py: two layers of width 64, at most 64
image tokens), where Python's per-step cost shows most. `bench` is the same recipe (tokenizer,
template, image processor, seeded weights, mlx-vlm's own classes) at a shape where compute
sets the pace, as it does for real checkpoints: a Qwen2 decoder of width 512 and 8 layers (the
text benchmark's shape) and a 4-layer ViT of width 256, with up to 256 image tokens, in float32
like the text benchmark's model (on a CPU, bf16 matmuls skip the BLAS and take ~10x longer).
"""

from __future__ import annotations

from pathlib import Path

from tests import vision_models

SIZES = ("tiny", "bench")
BENCH = vision_models.Shape(
    "qwen2-vl-bench",
    text={"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
          "intermediate_size": 1408, "max_window_layers": 8,
          # head_dim 64: its 32 rotary frequencies split over time, height and width as Qwen2-VL's 64
          "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}},
    vision={"depth": 4, "embed_dim": 256, "hidden_size": 512, "num_heads": 4, "mlp_ratio": 4},
    max_pixels=28 * 28 * 256,  # 256 image tokens
    dtype="float32")


def build(models_dir: Path, size: str) -> Path:
    """The checkpoint of `size` under `models_dir` (built once, then reused)."""
    return vision_models.build(models_dir, vision_models.TINY if size == "tiny" else BENCH)
