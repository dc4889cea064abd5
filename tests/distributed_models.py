"""Models to shard over several ranks (tests and ``scripts/bench_distributed.py``), built offline.

Which families shard how, in mlx-lm 0.32.2 (``hasattr(model, "shard")`` for tensor parallel,
``hasattr(model.model, "pipeline")`` for pipeline parallel; checked on the families of
``tests/families.py``): see ``TENSOR_FAMILIES`` and ``PIPELINE_FAMILIES``. Gemma 2, Gemma 3 and
Phi-3 shard neither way; llama, mistral and dense qwen3 only by tensor.

How many ranks a model divides over: tensor mode splits every layer's heads, KV heads and MLP
width by the group size (mlx-lm floors ``n_heads // N`` and slices weights, so an uneven split
loads but computes garbage, or fails on a shape); pipeline mode gives each rank at least one
layer. The families' tiny builds (4 heads, 2 KV heads, MLP 128, 2 layers) therefore shard over 2
ranks, never 3. ``build_group_model`` builds a family at a shape that splits over 2 and 3 ranks
in both modes (6 heads, 6 KV heads, MLP 192, 6 layers: still tiny). ``divides`` says whether a
model splits over N ranks in a mode.

Measured with real rings across namespaces (greedy tokens of the sharded model against one
process): on fp32 weights every supported (family, mode) gives the same tokens, over 2 ranks for
the tiny builds and over 2 and 3 for ``build_group_model``'s. Three things to know:
- bf16 tensor mode is not token-identical on random tiny weights: a split matmul sums in another
  order, and bf16 rounding then flips near-tied logits (qwen2.5 with the real Qwen vocabulary
  diverged at its 3rd token). Compare tensor-mode output on fp32 copies of the weights.
- MoE families need fp32 on MLX's CPU backend (``GatherMM`` supports only float32), sharded or not.
- 4-bit tensor sharding needs each rank's slice of a sharded input (attention output, MLP width)
  to be whole quantization groups (64): the tiny 4-bit builds fail over 2 ranks ("last dimension
  ... divisible by the quantization group size 64"); pipeline mode is unaffected.

``sharded_load`` in pipeline mode reads ``model.safetensors.index.json`` to find the files a
rank needs; ``shardable_copy`` writes one for a checkpoint that has none (the demo-model builder
writes a single ``model.safetensors`` without it).

``build_bench_model`` is the benchmark's model: the demo model's recipe (byte-level BPE on the
demo corpus, ChatML, seeded numpy weights, fp32) at a larger shape, as a ``qwen2`` checkpoint
(the llama weights plus zero q/k/v biases), so that the one model pipelines and tensor-shards
and a small vocabulary keeps the replicated embedding and head cheap: the per-token compute is
in the layers that sharding splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from sidecar.engine.sharding import INDEX_FILE
from tests.families import FAMILIES_BY_NAME, build, install

# Checked against mlx-lm 0.32.2 (see the module docstring); ``sharding_modes`` asks the model.
TENSOR_FAMILIES = ("llama3", "mistral", "qwen2.5", "qwen2.5-coder", "qwen3", "qwen3-moe", "deepseek-v2")
PIPELINE_FAMILIES = ("qwen2.5", "qwen2.5-coder", "qwen3-moe", "deepseek-v2")

# Splits evenly over 1, 2, 3 and 6 ranks: heads, KV heads, MLP width and layers.
GROUP_SHAPE = {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": 16,
               "intermediate_size": 192, "num_hidden_layers": 6}
_GROUP_MARKER = "localmlx_group.json"


def sharding_modes(model_dir: Path) -> set[str]:
    """{"tensor", "pipeline"} or a subset: what mlx-lm can do with this checkpoint."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir), lazy=True, strict=False)
    modes = set()
    if hasattr(model, "shard"):
        modes.add("tensor")
    if hasattr(model, "model") and hasattr(model.model, "pipeline"):
        modes.add("pipeline")
    return modes


def divides(model_dir: Path, ranks: int, mode: str) -> bool:
    """Whether the checkpoint's shape splits evenly over ``ranks`` ranks in ``mode``. Quantized
    weights split in tensor mode only where each rank's slice of a sharded input width (attention
    output, MLP width) is whole quantization groups."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if mode == "pipeline":
        return config["num_hidden_layers"] >= ranks
    heads = config["num_attention_heads"]
    attention = heads * (config.get("head_dim") or config["hidden_size"] // heads)
    mlps = [config["intermediate_size"], *([config["moe_intermediate_size"]] if "moe_intermediate_size" in config else [])]
    counts = [heads, config.get("num_key_value_heads") or heads, attention, *mlps]
    if any(c % ranks for c in counts):
        return False
    group = (config.get("quantization") or {}).get("group_size")
    return group is None or all((width // ranks) % group == 0 for width in (attention, *mlps))


# ---- the index pipeline mode needs -------------------------------------------------------------


def safetensors_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file (its JSON header only)."""
    with open(path, "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    return [name for name in header if name != "__metadata__"]


def weight_index(model_dir: Path) -> dict[str, Any]:
    """What ``mlx_lm.utils.save_model`` writes: every tensor name mapped to its file."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    weight_map = {name: file.name for file in files for name in safetensors_names(file)}
    total = sum(file.stat().st_size for file in files)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def shardable_copy(src_dir: Path, dest_dir: Path) -> Path:
    """``src_dir`` at ``dest_dir`` (files hardlinked where the filesystem allows, else copied)
    with a ``model.safetensors.index.json``, written if the source has none. Unchanged if
    ``dest_dir`` already holds the same file names and an index; built beside it and renamed
    into place, so it is never half-written."""
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    wanted = {p.name for p in src_dir.iterdir() if p.is_file()} | {INDEX_FILE}
    if dest_dir.is_dir() and {p.name for p in dest_dir.iterdir()} == wanted:
        return dest_dir
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
    try:
        for file in src_dir.iterdir():
            if file.is_file():
                _link_or_copy(file, tmp / file.name)
        if not (tmp / INDEX_FILE).exists():
            (tmp / INDEX_FILE).write_text(json.dumps(weight_index(tmp), indent=2) + "\n")
        _install(tmp, dest_dir, lambda: dest_dir.is_dir() and {p.name for p in dest_dir.iterdir()} == wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dest)


def _install(tmp: Path, dest: Path, complete: Any) -> None:
    tmp.chmod(0o755)  # mkdtemp's 0700: readable by the ranks whatever user they run as
    install(tmp, dest, complete)


# ---- a family at a shape that splits over 2 and 3 ranks ----------------------------------------


def build_group_model(models_dir: Path, family_name: str, quantization: str = "bf16") -> Path:
    """``tests/families.py``'s family at ``GROUP_SHAPE`` (its vocabulary, template, special
    tokens): ``<models_dir>/group-<digest>/<family>-group-<quantization>``. The digest covers the
    shape, so a changed shape is a new directory (families.py caches by its own content)."""
    family = FAMILIES_BY_NAME[family_name]
    config = {**family.config, **GROUP_SHAPE}
    if family.model_type in ("qwen2",):
        config.pop("head_dim")  # qwen2 derives it: hidden_size / heads = 16
        config["max_window_layers"] = GROUP_SHAPE["num_hidden_layers"]
    if "moe_intermediate_size" in config:
        config["moe_intermediate_size"] = 96
    variant = dataclasses.replace(family, name=f"{family.name}-group", config=config)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return build(Path(models_dir) / f"group-{digest}", variant, quantization)


# ---- the benchmark model -----------------------------------------------------------------------


def bench_shape() -> Any:
    """~57M parameters: hidden 768, 8 layers, 12 heads of 64, 6 KV heads, MLP 2304 (heads, KV
    heads and MLP split over 2 and 3 ranks; 8 layers pipeline over up to 8)."""
    from sidecar.demo_model import ModelShape

    return ModelShape(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=6, intermediate_size=2304)


BENCH_MARKER = "localmlx_bench.json"


def bench_digest() -> str:
    """Everything that shapes the benchmark model: this file, the demo builder, the corpus."""
    from sidecar import demo_model

    h = hashlib.sha256()
    for path in (Path(__file__), Path(demo_model.__file__), demo_model.CORPUS_PATH):
        h.update(path.read_bytes())
    h.update(json.dumps(dataclasses.asdict(bench_shape()), sort_keys=True).encode())
    return h.hexdigest()[:16]


def build_bench_model(models_dir: Path) -> Path:
    """``<models_dir>/localmlx-bench-qwen2``: fp32, ChatML, shardable both ways; cached by
    content (a marker holds the digest; a stale build is replaced atomically)."""
    dest = Path(models_dir) / "localmlx-bench-qwen2"
    digest = bench_digest()
    if _marker_digest(dest) == digest:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_bench_model(tmp)
        (tmp / BENCH_MARKER).write_text(json.dumps({"digest": digest}) + "\n")
        _install(tmp, dest, lambda: _marker_digest(dest) == digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _marker_digest(path: Path) -> str | None:
    try:
        return str(json.loads((path / BENCH_MARKER).read_text())["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_bench_model(out: Path) -> None:
    import numpy as np

    from sidecar import demo_model

    shape = bench_shape()
    demo_model.write_model_files(out, shape)  # a llama checkpoint
    (out / demo_model.MARKER_FILE).unlink()
    llama = json.loads((out / "config.json").read_text())
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              **{k: llama[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                        "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                        "rope_theta", "max_position_embeddings", "vocab_size",
                                        "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype")},
              "hidden_act": "silu", "use_sliding_window": False}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # qwen2's q/k/v projections carry biases: zeros keep the llama's function.
    weights = _read_safetensors(out / "model.safetensors")
    for i in range(shape.num_layers):
        for proj, width in (("q", shape.num_heads), ("k", shape.num_kv_heads), ("v", shape.num_kv_heads)):
            weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.zeros(width * shape.head_dim, np.float32)
    demo_model._write_safetensors(out / "model.safetensors", weights)
    (out / INDEX_FILE).write_text(json.dumps(weight_index(out), indent=2) + "\n")


def _read_safetensors(path: Path) -> dict[str, Any]:
    """The fp32 tensors of a safetensors file as numpy arrays (what the demo builder writes)."""
    import numpy as np

    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    body = memoryview(data)[8 + size:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32", entry["dtype"]
        start, end = entry["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype="<f4").reshape(entry["shape"]).copy()
    return out


def parameter_count(model_dir: Path) -> int:
    """Parameters in the checkpoint's safetensors files (from their headers)."""
    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total
