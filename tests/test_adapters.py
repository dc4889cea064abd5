"""Adapters served beside their base: <base>+<adapter> is a model of its own that shares the
base's weights, gives mlx-lm's own tokens, lists, deletes and fuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sidecar.client import RpcCallError
from sidecar.demo_model import DEMO_MODEL_DIRNAME

from .conftest import Sidecars
from .tuning_models import build_random_adapter

PROMPTS = ("Tell me about the sea", "Once upon a time", "The garden in spring")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def adapters(models_dir: Path) -> dict[str, Path]:
    """Two LoRA adapters and a DoRA one for the demo model, in the models dir's adapters/."""
    base = models_dir / DEMO_MODEL_DIRNAME
    root = models_dir / "adapters"
    made = {"sea": build_random_adapter(base, root / "sea", seed=1),
            "garden": build_random_adapter(base, root / "garden", seed=2, rank=4, num_layers=2),
            "dora": build_random_adapter(base, root / "dora", seed=3, fine_tune_type="dora")}
    yield made
    for path in made.values():
        shutil.rmtree(path, ignore_errors=True)


def mlx_lm_text(model_path: Path, adapter: Path | None, prompt: str) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_path), adapter_path=None if adapter is None else str(adapter))[:2]
    return generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)


def generate(client, model: str, prompt: str) -> str:  # type: ignore[no-untyped-def]
    return str(client.request("generate", {"model": model, "prompt": prompt, "maxTokens": MAX_TOKENS,
                                           "temperature": 0, "cache": False})["text"])


def test_an_adapter_gives_the_tokens_of_mlx_lm_with_the_same_adapter_alone_and_batched(
        sidecars: Sidecars, demo_model_path: Path, adapters: dict[str, Path]) -> None:
    client = sidecars.spawn()
    for name in ("sea", "dora"):
        expected = {p: mlx_lm_text(demo_model_path, adapters[name], p) for p in PROMPTS}
        model = f"demo+{name}"
        assert generate(client, model, PROMPTS[0]) == expected[PROMPTS[0]]  # alone
        ids = {p: client.start_request("generate", {"model": model, "prompt": p, "maxTokens": MAX_TOKENS,
                                                    "temperature": 0, "cache": False}) for p in PROMPTS}
        assert {p: client.wait_response(i)["result"]["text"] for p, i in ids.items()} == expected  # together
    assert generate(client, "demo", PROMPTS[0]) == mlx_lm_text(demo_model_path, None, PROMPTS[0])
    assert generate(client, "demo+sea", PROMPTS[0]) != generate(client, "demo", PROMPTS[0])


def test_adapters_share_their_base_weights_and_the_budget_counts_the_base_once(
        sidecars: Sidecars, adapters: dict[str, Path]) -> None:
    client = sidecars.spawn()
    base = client.request("models/load", {"model": "demo"})
    before = client.request("server/status")["memory"]["activeBytes"]
    sea = client.request("models/load", {"model": "demo", "adapter": "sea"})
    garden = client.request("models/load", {"model": "demo+garden"})  # by its served name
    status = client.request("server/status")
    grown = status["memory"]["activeBytes"] - before
    assert (sea["model"], sea["base"], sea["adapter"]) == ("demo+sea", "demo", "sea")
    assert (garden["model"], garden["base"], garden["adapter"]) == ("demo+garden", "demo", "garden")
    assert sea["bytes"] + garden["bytes"] < base["bytes"] / 4
    # Two variants cost their adapters (and a little warm-up cache), not two more copies of the base.
    assert grown < base["bytes"] / 2, (grown, base["bytes"])
    assert status["memory"]["modelBytes"] == base["bytes"] + sea["bytes"] + garden["bytes"]
    assert {m["model"]: m.get("base") for m in status["models"]} == {
        "demo": None, "demo+sea": "demo", "demo+garden": "demo"}


def test_unloading_the_base_unloads_its_adapters(sidecars: Sidecars, adapters: dict[str, Path]) -> None:
    client = sidecars.spawn()
    client.request("models/load", {"model": "demo", "adapter": "sea"})
    assert {m["model"] for m in client.request("server/status")["models"]} == {"demo", "demo+sea"}
    assert client.request("models/unload", {"model": "demo"})["unloaded"] is True
    assert client.request("server/status")["models"] == []
    # Unloading only the variant keeps the base.
    client.request("models/load", {"model": "demo+sea"})
    client.request("models/unload", {"model": "demo+sea"})
    assert [m["model"] for m in client.request("server/status")["models"]] == ["demo"]


def test_models_list_shows_adapters_and_delete_removes_one(
        sidecars: Sidecars, models_dir: Path, demo_model_path: Path) -> None:
    path = build_random_adapter(demo_model_path, models_dir / "adapters" / "doomed", seed=9, rank=2)
    client = sidecars.spawn()
    client.request("models/load", {"model": "demo", "adapter": "doomed"})
    listed = {a["name"]: a for a in client.request("models/list")["adapters"]}
    doomed = listed["doomed"]
    assert (doomed["path"], doomed["rank"], doomed["numLayers"], doomed["fineTuneType"]) == (str(path), 2, 4, "lora")
    assert doomed["loadedAs"] == ["demo+doomed"] and doomed["training"] is None
    assert doomed["bytes"] == (path / "adapters.safetensors").stat().st_size
    assert all(m["model"] != "adapters" for m in client.request("models/list")["models"])
    with pytest.raises(RpcCallError) as refused:
        client.request("models/delete", {"adapter": "doomed"})
    assert refused.value.code == -32602 and refused.value.data["loaded"] is True
    with pytest.raises(RpcCallError) as variant:  # never the base's files by the variant's name
        client.request("models/delete", {"model": "demo+doomed"})
    assert variant.value.code == -32602
    deleted = client.request("models/delete", {"adapter": "doomed", "force": True})
    assert deleted["deleted"] and deleted["unloaded"] and deleted["bytesFreed"] > 0
    assert not path.exists() and demo_model_path.is_dir()
    assert "doomed" not in {a["name"] for a in client.request("models/list")["adapters"]}
    assert [m["model"] for m in client.request("server/status")["models"]] == ["demo"]


def test_bad_adapters_are_refused_and_the_sidecar_goes_on(
        sidecars: Sidecars, models_dir: Path, tmp_path: Path) -> None:
    (models_dir / "adapters" / "empty").mkdir(parents=True, exist_ok=True)
    client = sidecars.spawn()

    def code(params: dict[str, object]) -> int:
        with pytest.raises(RpcCallError) as error:
            client.request("models/load", params)
        return error.value.code

    assert code({"model": "demo", "adapter": "missing"}) == -32010
    assert code({"model": "demo", "adapter": "empty"}) == -32602
    assert code({"model": "demo", "adapter": str(tmp_path)}) == -32018  # outside the allowed roots
    assert code({"model": "demo+sea", "adapter": "sea"}) == -32602  # an adapter on an adapter
    assert client.request("ping") == {}


def test_a_fused_model_loads_like_any_other_and_answers_as_the_adapter_does(
        sidecars: Sidecars, models_dir: Path, adapters: dict[str, Path]) -> None:
    client = sidecars.spawn()
    fused = client.request("models/fuse", {"model": "demo", "adapter": "sea", "name": "demo-sea-fused"})
    try:
        assert fused["model"] == "demo-sea-fused" and Path(fused["path"]) == models_dir / "demo-sea-fused"
        assert fused["quantization"] is None and fused["bytes"] > 0
        assert generate(client, "demo-sea-fused", PROMPTS[0]) == generate(client, "demo+sea", PROMPTS[0])
        quantized = client.request("models/fuse", {"model": "demo", "adapter": "sea", "name": "demo-sea-q4",
                                                    "quantize": {"bits": 4}})
        assert quantized["quantization"]["bits"] == 4 and quantized["bytes"] < fused["bytes"]
        assert generate(client, "demo-sea-q4", PROMPTS[0])  # it loads and answers
        with pytest.raises(RpcCallError) as exists:
            client.request("models/fuse", {"model": "demo", "adapter": "sea", "name": "demo-sea-fused"})
        assert exists.value.code == -32602
        assert not list(models_dir.glob(".demo-sea-*"))  # nothing half-written left beside them
    finally:
        for name in ("demo-sea-fused", "demo-sea-q4"):
            shutil.rmtree(models_dir / name, ignore_errors=True)
