"""Models and data for the adapter and fine-tuning tests, built here from the demo model.

The demo model's tied embeddings are tiny (std 0.02), so no adapter on its linear layers can
lift one token far above the rest; the learner is the demo with embeddings ten times larger,
which a LoRA adapter teaches a short fact in about a hundred steps. A random adapter stands
for one trained elsewhere: mlx-lm's own layers, seeded random weights, written as mlx-lm does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sidecar.demo_model import build_demo_model

FACT_PROMPT = "The secret code of the vault is"
FACT = " 7421."
LEARNER = "learner"


def build_learner(models_dir: Path) -> Path:
    import mlx.core as mx

    path = models_dir / LEARNER
    if (path / "config.json").is_file():
        return path
    staging = models_dir / f".{LEARNER}.building"
    shutil.rmtree(staging, ignore_errors=True)
    build_demo_model(staging)
    for file in staging.glob("*.safetensors"):
        weights = mx.load(str(file))
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 10.0
        mx.save_safetensors(str(file), weights)
    staging.rename(path)
    return path


def write_fact_dataset(folder: Path, train: int = 24, valid: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"text": FACT_PROMPT + FACT}) + "\n"
    (folder / "train.jsonl").write_text(line * train)
    (folder / "valid.jsonl").write_text(line * valid)
    return folder


def build_random_adapter(model_path: Path, out: Path, seed: int, rank: int = 8, num_layers: int = 4,
                         fine_tune_type: str = "lora", base: str | None = None) -> Path:
    """An adapter as mlx-lm writes one, with seeded random weights in both LoRA matrices (a
    fresh one's B is zero, which would change nothing)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path, lazy=True)
    model.freeze()
    parameters = {"rank": rank, "dropout": 0.0, "scale": 20.0}
    mx.random.seed(seed)  # mlx-lm draws lora_a from MLX's global generator
    linear_to_lora_layers(model, num_layers, parameters, use_dora=fine_tune_type == "dora")
    keys = mx.random.split(mx.random.key(seed), len(tree_flatten(model.trainable_parameters())))
    weights = {}
    for i, (name, value) in enumerate(tree_flatten(model.trainable_parameters())):
        noise = mx.random.normal(value.shape, key=keys[i]) * 0.01
        weights[name] = noise if name.endswith("lora_b") else value  # lora_a (and DoRA's m) as mlx-lm made them
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": parameters}
    if base is not None:  # mlx_lm.lora writes the model it trained on
        config["model"] = base
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
