"""Tests for the embedded demo model builder (real build, real mlx-lm load)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import demo_model
from sidecar.demo_model import (
    DEMO_MODEL_DIRNAME,
    ModelShape,
    build_demo_model,
    bytes_to_unicode,
    ensure_demo_model,
    is_complete,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digests(path: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / DEMO_MODEL_DIRNAME)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlx_lm import load

    return load(str(model_dir))


def test_build_is_complete_and_deterministic(model_dir, tmp_path):
    assert is_complete(model_dir)
    again = build_demo_model(tmp_path / "again")
    assert _digests(again) == _digests(model_dir)
    # Nothing but the model itself is left next to it (no temp dirs).
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_build_leaves_complete_model_unchanged(model_dir):
    before = {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()}
    assert build_demo_model(model_dir) == model_dir
    assert {f.name: f.stat().st_mtime_ns for f in model_dir.iterdir()} == before


def test_incomplete_dir_is_replaced(tmp_path):
    dest = tmp_path / DEMO_MODEL_DIRNAME
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # e.g. an older or broken build
    assert not is_complete(dest)
    assert ensure_demo_model(tmp_path) == dest
    assert is_complete(dest)
    assert json.loads((dest / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MODEL_DIRNAME]


def test_another_shape_never_passes_for_the_demo(tmp_path, model_dir):
    shape = ModelShape(num_layers=2, intermediate_size=384)
    dest = build_demo_model(tmp_path / "small", shape)
    config = json.loads((dest / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 384)
    assert is_complete(dest, shape) and not is_complete(dest)
    assert not is_complete(model_dir, shape)
    # Same corpus, so the same tokenizer.
    assert (dest / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert build_demo_model(dest) == dest and is_complete(dest)  # rebuilt as the demo
    assert _digests(dest) == _digests(model_dir)


def test_concurrent_builders_agree(tmp_path, model_dir):
    code = (
        "import sys; from pathlib import Path; from sidecar.demo_model import "
        "ensure_demo_model; print(ensure_demo_model(Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outputs) == {str(tmp_path / DEMO_MODEL_DIRNAME)}
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MODEL_DIRNAME]
    assert _digests(tmp_path / DEMO_MODEL_DIRNAME) == _digests(model_dir)


def test_import_prints_nothing():
    out = subprocess.run(
        [sys.executable, "-c", "import sidecar.demo_model"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "" and out.stderr == ""


def test_generates_to_max_tokens_at_temperature_zero(loaded):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about lighthouses."}],
        add_generation_prompt=True,
    )
    greedy = make_sampler(0.0)
    responses = list(
        stream_generate(model, tokenizer, prompt, max_tokens=40, sampler=greedy)
    )
    assert len(responses) == 40
    assert responses[-1].generation_tokens == 40
    assert responses[-1].finish_reason == "length"
    tokens = {r.token for r in responses}
    assert not tokens & tokenizer.eos_token_ids
    assert len(tokens) > 1


def test_tokenizer_wrapper_setup(loaded):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    _, tokenizer = loaded
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.bos_token is None
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)


def test_chat_template_renders_chatml(loaded):
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Ça va ? 日本"},
    ]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nÇa va ? 日本<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 4


def test_multibyte_round_trip(loaded):
    _, tokenizer = loaded
    text = "Ελληνικά, русский, 日本語, 中文, café, 🦊🕰️ and ½ ≈ 0.5"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_vocab_has_partial_utf8_tokens(loaded):
    _, tokenizer = loaded
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    partial = []
    for token in tokenizer.get_vocab():
        if token in demo_model.SPECIAL_TOKENS:
            continue
        raw = bytes(byte_of[c] for c in token)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(raw)
    # Merged (multi-byte) tokens that still cut a character in two.
    assert any(len(raw) > 1 for raw in partial)


def test_config_matches_weights(model_dir):
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab)))  # ids contiguous
    assert config["vocab_size"] == len(vocab)
    embed = mx.load(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert embed.shape == (len(vocab), config["hidden_size"])
    assert config["eos_token_id"] == vocab["<|im_end|>"]
