"""A vision-language model as the engine holds it: mlx-vlm's model and processor, and the
request's prompt built the way mlx-vlm builds it (the chat template with an image placeholder
per image, then the processor, which expands each placeholder into the image's tokens and
turns the pictures into pixel values).

mlx-vlm is imported here only, when a vision model is loaded or prompted: the text-only path
never imports it, and a machine without the extra serves text models as before.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParams, ModelLoadFailed
from ..model_config import read_config
from .images import MessageImage

INSTALL_HINT = "install the vision extra: pip install 'localmlx[vision]' (scripts/setup.sh does)"


def has_vision_config(path: Path) -> bool:
    """A checkpoint with a vision tower: its config.json has a vision_config."""
    config = read_config(path)
    return config is not None and isinstance(config.get("vision_config"), dict)


def vision_installed() -> bool:
    return importlib.util.find_spec("mlx_vlm") is not None


def is_vision_model(path: Path) -> bool:
    """Served through mlx-vlm: a vision checkpoint, with mlx-vlm installed. Without mlx-vlm,
    a checkpoint mlx-lm also reads (Gemma 3, Mistral 3...) is served as text only."""
    return has_vision_config(path) and vision_installed()


def capabilities_on_disk(path: Path) -> list[str]:
    """What a model not loaded will serve, judged from its files (a loaded model says exactly)."""
    from ..embeddings.detect import embedding_kind

    if embedding_kind(path) is not None:
        return ["embed"]
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tokenizer_config = {}
    chat = (isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))) or any(
        (path / name).is_file() for name in ("chat_template.json", "chat_template.jinja"))
    return (["chat"] if chat else []) + ["generate"] + (["vision"] if is_vision_model(path) else [])


@dataclass
class VisionInputs:
    """What the processor made of one request: token ids (image tokens expanded), the image
    pixel values, and the extra arrays its model wants (Qwen2-VL: image_grid_thw)."""

    input_ids: Any  # mx.array, (1, prompt tokens)
    pixel_values: Any  # mx.array or None (a text-only chat)
    mask: Any
    extra: dict[str, Any]
    tokens: list[int]  # input_ids, as the engine's prompt
    image_tokens: int


@dataclass
class VisionParts:
    """mlx-vlm's side of a loaded vision model."""

    processor: Any
    image_token_id: int | None

    def inputs(self, model: Any, text: str, images: list[MessageImage]) -> VisionInputs:
        """`text` (the rendered template) and the pictures through the processor, as mlx-vlm's
        generate prepares them (worker thread, under the tokenizer lock)."""
        import numpy as np
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        pictures = [image.picture for image in images] or None
        inputs = prepare_inputs(self.processor, images=pictures, prompts=text,
                                image_token_index=getattr(model.config, "image_token_index", None),
                                add_special_tokens=should_add_special_tokens(model.config.model_type, self.processor))
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        input_ids = inputs["input_ids"]
        # Read through numpy: the arrays hold their data already, and no MLX computation runs
        # off the engine thread.
        tokens = np.asarray(input_ids).reshape(-1).tolist()
        image_tokens = tokens.count(self.image_token_id) if self.image_token_id is not None and pictures else 0
        return VisionInputs(input_ids, inputs.get("pixel_values"), inputs.get("attention_mask"), extra, tokens,
                            image_tokens)


def load_vision_model(path: Path) -> tuple[Any, Any, dict[str, Any], VisionParts]:
    """(model, mlx-lm tokenizer wrapper, config, processor parts), on the engine thread."""
    if not vision_installed():
        raise ModelLoadFailed(f"{path.name} is a vision model: {INSTALL_HINT}", reason="vision-not-installed")
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import load

    model, processor = load(str(path))
    config = read_config(path)
    assert config is not None  # mlx-vlm has just loaded the model from it
    eos = config.get("eos_token_id") or config.get("text_config", {}).get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else None
    tokenizer = load_tokenizer(path, eos_token_ids=eos_ids)
    template = getattr(processor, "chat_template", None)
    if template and getattr(tokenizer, "chat_template", None) is None:
        tokenizer._tokenizer.chat_template = template  # the processor's template (chat_template.json)
    image_token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    return model, tokenizer, config, VisionParts(processor, image_token)


def refuse_images(model: str, capabilities: list[str]) -> InvalidParams:
    return InvalidParams(f"Model {model} does not take images: it has no vision capability (load a vision model, "
                         "e.g. a Qwen2-VL or Gemma 3 checkpoint, with the vision extra installed)",
                         errors=[{"path": "/messages", "message": "images need a vision model"}],
                         model=model, capabilities=capabilities, reason="no-vision")
