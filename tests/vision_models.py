"""A tiny vision-language checkpoint, built locally and offline: Qwen2-VL's architecture as
mlx-vlm loads it (``model_type`` qwen2_vl: a ViT with 2-D rotary patches and a 2×2 patch merger,
feeding a Qwen2 decoder with multimodal rotary positions), shrunk to two layers of width 64 in
both towers, with seeded random weights, the real Qwen vocabulary and added tokens
(``<|vision_start|>``, ``<|image_pad|>``... at their real ids, from ``tests/families.py``), the
real Qwen2-VL-Instruct chat template, and the real image processor settings (mean, std, 14-pixel
patches, merge size 2, temporal patch 2) with a small ``max_pixels`` so an image costs 4 to 64
tokens. ``mlx_vlm.load`` opens it as it opens ``mlx-community/Qwen2-VL-2B-Instruct-bf16``.

Built once per content digest, in a temporary sibling renamed into place (see families.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import families

NAME = "qwen2-vl-tiny"
TEMPLATE = "qwen2-vl-instruct.jinja"
MIN_PIXELS = 56 * 56  # 4 merged patches (tokens)
MAX_PIXELS = 28 * 28 * 64  # 64 tokens
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "rescale_factor": 1 / 255, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
}
VISION = {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
          "mlp_ratio": 2, "in_channels": 3, "patch_size": 14, "spatial_patch_size": 14,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
_FAMILY = families.Family(  # the text side: Qwen2.5's tokenizer, Qwen2-VL's template
    NAME, "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", TEMPLATE, {}, specials=families.QWEN25_ADDED, bos=None,
    eos="<|im_end|>", pad="<|endoftext|>", stop=("<|endoftext|>",), tokenizer="qwen", specials_first=False,
    non_special=families.QWEN_NON_SPECIAL, tokenizer_config=families._QWEN25_TOKENIZER_CONFIG)


@dataclass(frozen=True)
class Shape:
    """A checkpoint of this recipe: its directory name, what it changes in the decoder's and the
    vision tower's configuration, its image budget and its weights' dtype."""

    name: str = NAME
    text: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS
    dtype: str = "bfloat16"


TINY = Shape()


def config(tokenizer: dict, shape: Shape = TINY) -> dict[str, Any]:
    ids = tokenizer["ids"]
    return {
        "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "sliding_window": 32768, "use_sliding_window": False,
        "max_window_layers": 2, "tie_word_embeddings": True, "vocab_size": families.QWEN_VOCAB_SIZE,
        # head_dim 16: the 8 rotary frequencies split over time, height and width as the real
        # model splits its 64 (16, 24, 24).
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {**VISION, **shape.vision},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": shape.dtype, **shape.text,
    }


def digest(shape: Shape = TINY) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([shape.name, shape.text, shape.vision, shape.max_pixels, shape.dtype]).encode())
    h.update((families.TEMPLATES_DIR / TEMPLATE).read_bytes())
    h.update(families.build_digest(families.FAMILIES_BY_NAME["qwen2.5"], "bf16").encode())
    for dist in ("mlx", "mlx-vlm"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()


def build(models_dir: Path, shape: Shape = TINY) -> Path:
    """The checkpoint of ``shape`` under ``models_dir`` (built once, then reused)."""
    return _built(Path(models_dir) / shape.name, digest(shape), lambda out: _write(out, shape))


def _built(dest: Path, mark: str, write: Callable[[Path], None]) -> Path:
    """``dest``, written by ``write`` into a temporary sibling renamed into place, unless a
    complete build with this digest is already there."""
    if families._is_complete(dest, mark):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        (tmp / families.MARKER_FILE).write_text(json.dumps({"digest": mark, "family": dest.name}) + "\n")
        families.install(tmp, dest, lambda: families._is_complete(dest, mark))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write(out: Path, shape: Shape) -> None:
    import mlx.core as mx
    from mlx_vlm.utils import save_config, save_weights

    tokenizer = families.build_tokenizer(_FAMILY)
    ids = tokenizer["ids"]
    cfg = config(tokenizer, shape)
    model = random_model(cfg, families.quiet_ids(tokenizer, cfg["vocab_size"]))
    model.set_dtype(getattr(mx, shape.dtype))
    save_weights(out, model)
    save_config(dict(cfg), config_path=out / "config.json")
    template = (families.TEMPLATES_DIR / TEMPLATE).read_text(encoding="utf-8")
    families._write_json(out / "tokenizer.json", tokenizer["json"])
    families._write_json(out / "tokenizer_config.json", families.tokenizer_config(_FAMILY, ids))
    families._write_json(out / "special_tokens_map.json", families.special_tokens_map(_FAMILY))
    families._write_json(out / "chat_template.json", {"chat_template": template})
    families._write_json(out / "preprocessor_config.json", {**IMAGE_PROCESSOR, "max_pixels": shape.max_pixels})
    families._write_json(out / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    families._write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False})


def random_model(cfg: dict[str, Any], quiet: list[int]) -> Any:
    """mlx-vlm's Qwen2-VL class for ``cfg`` with seeded numpy weights (as families.random_model)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    params = dict(cfg)  # from_dict adds text_config to it, which update_module_configs reads
    module, _ = get_model_and_args(params)
    model_config = module.ModelConfig.from_dict(params)
    model_config = update_module_configs(model_config, module, params, ["text", "vision"])
    model = module.Model(model_config)
    rng = np.random.default_rng(zlib.crc32(NAME.encode()))
    weights = []
    for name, param in sorted(tree_flatten(model.parameters())):
        shape = tuple(param.shape)
        if len(shape) == 1:
            value = np.zeros(shape, np.float32) if name.endswith("bias") else np.array(param, np.float32)
        elif name.endswith("embed_tokens.weight"):  # tied: also the output rows
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            value[quiet] *= np.float32(0.01)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in ** -0.5)
        weights.append((name, mx.array(value)))
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model


def image(seed: int, width: int, height: int, fmt: str = "PNG") -> bytes:
    """A seeded noise image in ``fmt`` (different seeds, different pixels)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Gemma 3 (a second architecture: a SigLIP tower, pooled to a fixed count of soft tokens per
# image, feeding Gemma 3's decoder with sliding-window layers; plain positions, no mrope)
# --------------------------------------------------------------------------------------------

GEMMA3_NAME = "gemma3-vision-tiny"
GEMMA3_TOKENS_PER_IMAGE = 4  # the 4x4 patches of a 56-pixel image, pooled 2x2
_GEMMA3_FAMILY = families.Family(
    GEMMA3_NAME, "gemma3", "google/gemma-3-4b-it", "gemma-3-it.jinja", {},
    specials=(*families.FAMILIES_BY_NAME["gemma3"].specials, "<image_soft_token>"),
    bos="<bos>", eos="<eos>", pad="<pad>", stop=("<end_of_turn>",), add_bos=True,
    tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "unk_token": "<unk>",
                      # as the real one: the processor finds its image tokens by these names
                      "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"}})
GEMMA3_IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": GEMMA3_TOKENS_PER_IMAGE,
    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 56, "width": 56},
}


def gemma3_config(tokenizer: dict) -> dict[str, Any]:
    ids = tokenizer["ids"]
    vocab_size = -(-tokenizer["size"] // 64) * 64
    return {
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": ids["<start_of_image>"], "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"], "mm_tokens_per_image": GEMMA3_TOKENS_PER_IMAGE,
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]], "pad_token_id": ids["<pad>"], "hidden_size": 64,
        "vocab_size": vocab_size,
        "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                        "query_pre_attn_scalar": 16, "sliding_window": 16, "sliding_window_pattern": 2,
                        "mm_tokens_per_image": GEMMA3_TOKENS_PER_IMAGE, "vocab_size": vocab_size,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14, "image_size": 56,
                          "vision_use_head": False},
        "torch_dtype": "bfloat16",
    }


def build_gemma3(models_dir: Path) -> Path:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((families.TEMPLATES_DIR / _GEMMA3_FAMILY.template).read_bytes())
    for dist in ("mlx", "mlx-vlm"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return _built(Path(models_dir) / GEMMA3_NAME, h.hexdigest(), _write_gemma3)


def _write_gemma3(out: Path) -> None:
    import mlx.core as mx
    from mlx_vlm.utils import save_config, save_weights

    tokenizer = families.build_tokenizer(_GEMMA3_FAMILY)
    ids = tokenizer["ids"]
    cfg = gemma3_config(tokenizer)
    model = random_model(cfg, families.quiet_ids(tokenizer, cfg["vocab_size"]))
    model.set_dtype(mx.bfloat16)
    save_weights(out, model)
    save_config(dict(cfg), config_path=out / "config.json")
    families._write_json(out / "tokenizer.json", tokenizer["json"])
    families._write_json(out / "tokenizer_config.json", families.tokenizer_config(_GEMMA3_FAMILY, ids))
    families._write_json(out / "special_tokens_map.json", families.special_tokens_map(_GEMMA3_FAMILY))
    families._write_json(out / "preprocessor_config.json", GEMMA3_IMAGE_PROCESSOR)
    families._write_json(out / "processor_config.json", {"image_seq_length": GEMMA3_TOKENS_PER_IMAGE,
                                                         "processor_class": "Gemma3Processor"})
    families._write_json(out / "generation_config.json", {
        "bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]], "do_sample": False})
