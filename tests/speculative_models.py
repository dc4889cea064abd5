"""A draft and a target model that give identical logits, built offline (tests and
``scripts/bench_speculative.py``).

Speculative decoding is only measurable on random weights if the draft predicts the target. So
the target is the draft plus extra decoder layers appended after the draft's own, whose
attention output projection (``o_proj``) and MLP down projection (``down_proj``) are all zeros:
each extra layer adds exactly 0.0 to the residual stream, so the final norm and the (tied) head
see the very same hidden state and both models give the same logits, while the target still
computes the extra layers' attention and MLP (random q/k/v, gate and up projections) on every
token: it costs more, and a draft that is always right is accepted 100 %.

Both are the demo model's recipe (``sidecar/demo_model.py``: byte-level BPE on the demo corpus,
ChatML, seeded numpy weights, fp32) as ``llama`` checkpoints, written with the demo's writers.
Cached by content: a marker in each directory holds a digest of this file, the demo builder,
the corpus and the shapes; a stale build is replaced atomically.

``build_copying_model`` builds the target with every layer's attention silent (for prompt
lookup): each token's logits depend on that token alone, so greedy output follows a fixed map
from token to token and soon cycles; a prompt holding the cycle is copied by the continuation.

Sizes (``PAIR_SIZES``):
- ``tiny``: hidden 64, draft 2 layers, target 2 + 6; both load in milliseconds (tests).
- ``bench``: the width of the distributed benchmark's model (hidden 768, 12 heads, MLP 2304),
  draft 1 layer (~7.9M parameters), target 1 + 7 = 8 layers (~57M): the target has ~7x the
  draft's parameters and took 7-9x its time per token (mlx_lm.stream_generate, 2 cores).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.distributed_models import _read_safetensors
from tests.families import install

PAIR_MARKER = "localmlx_speculative.json"
EXTRA_LAYER_SEED = 20250219  # the extra layers' q/k/v, gate and up: random, never seen by the output


@dataclasses.dataclass(frozen=True)
class PairShape:
    draft: Any  # sidecar.demo_model.ModelShape
    extra_layers: int  # appended to the draft's layers to make the target


def _pair_sizes() -> dict[str, PairShape]:
    from sidecar.demo_model import ModelShape

    return {
        "tiny": PairShape(ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=128), extra_layers=6),
        "bench": PairShape(ModelShape(hidden_size=768, num_layers=1, num_heads=12, num_kv_heads=6,
                                      intermediate_size=2304), extra_layers=7),
    }


PAIR_SIZES = _pair_sizes()


def pair_names(size: str = "tiny") -> tuple[str, str]:
    """The directory names (what a request's ``model`` / ``draftModel`` says): (draft, target)."""
    return f"localmlx-spec-{size}-draft", f"localmlx-spec-{size}-target"


def pair_digest(size: str) -> str:
    from sidecar import demo_model

    h = hashlib.sha256()
    for path in (Path(__file__), Path(demo_model.__file__), demo_model.CORPUS_PATH):
        h.update(path.read_bytes())
    shape = PAIR_SIZES[size]
    h.update(json.dumps({"draft": dataclasses.asdict(shape.draft), "extra": shape.extra_layers},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def build_speculative_pair(models_dir: Path, *, size: str = "tiny") -> tuple[Path, Path]:
    """(draft_dir, target_dir) under ``models_dir``, named by ``pair_names(size)``; built once,
    then reused while their markers hold the current digest."""
    shape = PAIR_SIZES[size]
    draft, target = (Path(models_dir) / name for name in pair_names(size))

    def write(tmps: list[Path]) -> None:
        _write_draft(tmps[0], shape)
        _write_target(tmps[0], tmps[1], shape)

    _build_cached({draft: "draft", target: "target"}, size, write)
    return draft, target


def copying_name(size: str = "bench") -> str:
    return f"localmlx-spec-{size}-copying"


def build_copying_model(models_dir: Path, *, size: str = "bench") -> Path:
    """The target of ``size`` with the attention of every layer silent (``o_proj`` zero in the
    draft's layers too): each position's logits then depend on its own token alone, so greedy
    decoding follows a fixed token-to-token map and soon repeats a cycle of it forever. A prompt
    that holds the cycle is copied by the continuation, token for token: what prompt lookup is
    for, which a random model with live attention never does (it loops in short bursts)."""
    shape = PAIR_SIZES[size]
    dest = Path(models_dir) / copying_name(size)

    def write(tmps: list[Path]) -> None:
        with tempfile.TemporaryDirectory(dir=tmps[0].parent) as draft:
            _write_draft(Path(draft), shape)
            _write_target(Path(draft), tmps[0], shape, silent_attention=True)

    _build_cached({dest: "copying"}, size, write)
    return dest


def _build_cached(roles: dict[Path, str], size: str, write: Callable[[list[Path]], None]) -> None:
    """Unless every directory in ``roles`` holds the current digest: ``write`` them all into
    temporary siblings, then rename each into place (never half-written; racing builders agree)."""
    digest = pair_digest(size)
    if all(_marker_digest(dest) == digest for dest in roles):
        return
    parent = next(iter(roles)).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmps = [Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent)) for dest in roles]
    try:
        write(tmps)
        for tmp, (dest, role) in zip(tmps, roles.items(), strict=True):
            (tmp / PAIR_MARKER).write_text(json.dumps({"digest": digest, "role": role, "size": size}) + "\n")
            tmp.chmod(0o755)  # mkdtemp's 0700; the model is not secret
            install(tmp, dest, functools.partial(_has_digest, dest, digest))
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def _has_digest(path: Path, digest: str) -> bool:
    return _marker_digest(path) == digest


def _marker_digest(path: Path) -> str | None:
    try:
        return str(json.loads((path / PAIR_MARKER).read_text())["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_draft(out: Path, shape: PairShape) -> None:
    from sidecar import demo_model

    demo_model.write_model_files(out, shape.draft)
    (out / demo_model.MARKER_FILE).unlink()  # not the demo: its marker would say so


def _write_target(draft: Path, out: Path, shape: PairShape, silent_attention: bool = False) -> None:
    """The draft's files, with ``extra_layers`` more layers that add zero to the residual (and,
    with ``silent_attention``, the draft's own layers' attention output zeroed too)."""
    from sidecar import demo_model

    for file in draft.iterdir():
        if file.is_file() and file.name not in ("config.json", "model.safetensors"):
            shutil.copy2(file, out / file.name)
    config = json.loads((draft / "config.json").read_text())
    first = config["num_hidden_layers"]
    config["num_hidden_layers"] = first + shape.extra_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = _read_safetensors(draft / "model.safetensors")
    if silent_attention:
        for i in range(first):
            name = f"model.layers.{i}.self_attn.o_proj.weight"
            weights[name] = weights[name] * 0
    for i in range(first, first + shape.extra_layers):
        weights.update(_silent_layer(i, shape.draft))
    demo_model._write_safetensors(out / "model.safetensors", weights)


def _silent_layer(index: int, shape: Any) -> dict[str, Any]:
    """Layer ``index``: random everywhere except the two projections that write to the
    residual stream, which are zero (so the layer's output equals its input, exactly)."""
    import numpy as np

    rng = np.random.default_rng([EXTRA_LAYER_SEED, index])
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim

    def linear(out_dim: int, in_dim: int) -> Any:
        return rng.standard_normal((out_dim, in_dim), dtype=np.float32) * np.float32(in_dim**-0.5)

    p = f"model.layers.{index}."
    return {p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": linear(q_dim, hidden),
            p + "self_attn.k_proj.weight": linear(kv_dim, hidden),
            p + "self_attn.v_proj.weight": linear(kv_dim, hidden),
            p + "self_attn.o_proj.weight": np.zeros((hidden, q_dim), np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "mlp.gate_proj.weight": linear(inter, hidden),
            p + "mlp.up_proj.weight": linear(inter, hidden),
            p + "mlp.down_proj.weight": np.zeros((hidden, inter), np.float32)}
