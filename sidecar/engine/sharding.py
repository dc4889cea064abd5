"""Loading one rank's shard of a model with mlx-lm's own `sharded_load` (tensor or pipeline
parallel), after checking, before any rank starts, that the model can be split that way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadFailed, brief

INDEX_FILE = "model.safetensors.index.json"


def check_shardable(path: Path, name: str, mode: str, world: Any) -> None:
    """A clear error for a model that cannot be split `mode`-wise over the group, raised on
    rank 0 before the followers are asked to load anything: the cases named here, then whatever
    mlx-lm's own split of the lazily loaded model refuses (a quantization group wider than a
    rank's slice, say). Splitting reads no weights and talks to no other rank."""
    from mlx_lm.utils import load_model

    size = int(world.size())
    model, config = load_model(path, lazy=True, strict=False)
    if mode == "pipeline":
        if not (hasattr(model, "model") and hasattr(model.model, "pipeline")):
            raise ModelLoadFailed(
                f"Model {name} ({config.get('model_type')}) cannot be split in pipeline mode: mlx-lm has no pipeline "
                "for this family (use LOCALMLX_DISTRIBUTED_MODE=tensor)", model=name, reason="no pipeline mode")
        if not (path / INDEX_FILE).exists():
            raise ModelLoadFailed(f"Model {name} has no {INDEX_FILE}, which pipeline mode needs to load one rank's "
                                  "layers (convert it with mlx_lm.convert)", model=name, reason="no weight index")
        layers = len(model.model.layers)
        if layers < size:
            raise ModelLoadFailed(f"Model {name} has {layers} layers: too few for a pipeline of {size} ranks",
                                  model=name, reason="too few layers")
    elif not hasattr(model, "shard"):
        raise ModelLoadFailed(
            f"Model {name} ({config.get('model_type')}) cannot be split in tensor mode: mlx-lm has no tensor "
            "parallelism for this family (try LOCALMLX_DISTRIBUTED_MODE=pipeline)", model=name, reason="no tensor mode")
    else:
        heads = [config.get(key) for key in ("num_attention_heads", "num_key_value_heads")]
        uneven = [h for h in heads if isinstance(h, int) and h % size]
        if uneven:
            raise ModelLoadFailed(f"Model {name} has {uneven[0]} attention heads: they do not split evenly over "
                                  f"{size} ranks in tensor mode", model=name, reason="heads do not split")
    try:
        if mode == "pipeline":
            model.model.pipeline(world)
        else:
            model.shard(world)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadFailed(f"Model {name} cannot be split in {mode} mode over {size} ranks: {brief(exc)}",
                              model=name, reason=f"no {mode} split") from None


def load_shard(source: str, world: Any, mode: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, config) of this rank's shard; `source` is a local directory or a Hub
    repo (in pipeline mode only the files of this rank's layers are downloaded). Ends in a
    collective: every rank must be loading the same model."""
    from mlx_lm.utils import sharded_load

    parts = sharded_load(source, pipeline_group=world if mode == "pipeline" else None,
                         tensor_group=world if mode == "tensor" else None, return_config=True)
    assert len(parts) == 3  # return_config
    model, tokenizer, config = parts
    return model, tokenizer, config
