"""Random Qwen2-VL checkpoints for `scripts/bench.py --vision`, at a chosen size.

`tiny` is the test model itself (tests/vision_models.py: two layers of width 64, at most 64
image tokens), where Python's per-step cost shows most. `bench` is the same recipe (tokenizer,
template, image processor, seeded weights, mlx-vlm's own classes) at a shape where compute
sets the pace, as it does for real checkpoints: a Qwen2 decoder of width 512 and 8 layers (the
text benchmark's shape) and a 4-layer ViT of width 256, with up to 256 image tokens, in float32
like the text benchmark's model (on a CPU, bf16 matmuls skip the BLAS and take ~10x longer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests import families, vision_models

SIZES = ("tiny", "bench")
BENCH_NAME = "qwen2-vl-bench"
BENCH_TEXT = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1408, "max_window_layers": 8,
              # head_dim 64: its 32 rotary frequencies split over time, height and width as Qwen2-VL's 64
              "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
BENCH_VISION = {"depth": 4, "embed_dim": 256, "hidden_size": 512, "num_heads": 4, "mlp_ratio": 4}
BENCH_MAX_PIXELS = 28 * 28 * 256  # 256 image tokens
BENCH_DTYPE = "float32"


def build(models_dir: Path, size: str) -> Path:
    """The checkpoint of `size` under `models_dir` (built once, then reused)."""
    if size == "tiny":
        return vision_models.build(models_dir)
    dest = Path(models_dir) / BENCH_NAME
    mark = vision_models.digest() + json.dumps([BENCH_TEXT, BENCH_VISION, BENCH_MAX_PIXELS, BENCH_DTYPE])
    if families._is_complete(dest, mark):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BENCH_NAME}.tmp-", dir=dest.parent))
    try:
        _write(tmp)
        (tmp / families.MARKER_FILE).write_text(json.dumps({"digest": mark, "family": BENCH_NAME}) + "\n")
        families.install(tmp, dest, lambda: families._is_complete(dest, mark))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def bench_config(tokenizer: dict[str, Any]) -> dict[str, Any]:
    cfg = vision_models.config(tokenizer)
    cfg.update(BENCH_TEXT)
    cfg["vision_config"] = {**cfg["vision_config"], **BENCH_VISION}
    return cfg


def _write(out: Path) -> None:
    """vision_models._write, with the bench shape and image budget."""
    import mlx.core as mx
    from mlx_vlm.utils import save_config, save_weights

    tokenizer = families.build_tokenizer(vision_models._FAMILY)
    ids = tokenizer["ids"]
    cfg = bench_config(tokenizer)
    model = vision_models.random_model(cfg, families.quiet_ids(tokenizer, cfg["vocab_size"]))
    model.set_dtype(getattr(mx, BENCH_DTYPE))
    save_weights(out, model)
    save_config({**cfg, "torch_dtype": BENCH_DTYPE}, config_path=out / "config.json")
    template = (families.TEMPLATES_DIR / vision_models.TEMPLATE).read_text(encoding="utf-8")
    families._write_json(out / "tokenizer.json", tokenizer["json"])
    families._write_json(out / "tokenizer_config.json", families.tokenizer_config(vision_models._FAMILY, ids))
    families._write_json(out / "special_tokens_map.json", families.special_tokens_map(vision_models._FAMILY))
    families._write_json(out / "chat_template.json", {"chat_template": template})
    families._write_json(out / "preprocessor_config.json",
                         {**vision_models.IMAGE_PROCESSOR, "max_pixels": BENCH_MAX_PIXELS})
    families._write_json(out / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    families._write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False})
