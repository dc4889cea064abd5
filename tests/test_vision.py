"""Images in the conversation: a tiny Qwen2-VL (tests/vision_models.py) served through mlx-vlm by
the real sidecar, checked token for token against mlx-vlm's own generate, and every bad image
refused with its reason before anything is loaded."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient
from tests import vision_models
from tests.conftest import chunks_of

pytest.importorskip("mlx_vlm")

MODEL = vision_models.NAME
QUESTION = "Describe this image."


@pytest.fixture(scope="module")
def vision_dir(models_dir: Path) -> Path:
    return vision_models.build(models_dir)


@pytest.fixture(scope="module")
def gemma_dir(models_dir: Path) -> Path:
    return vision_models.build_gemma3(models_dir)


@pytest.fixture(scope="module")
def served(vision_dir: Path, sidecar_env: dict[str, str]):
    from tests.conftest import serving

    with serving(dict(sidecar_env, LOCALMLX_PREFILL_STEP_SIZE="8")) as client:
        yield client


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_chat(*images: str, text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    parts = [{"type": "text", "text": text}, *({"type": "image", "image": i} for i in images)]
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "temperature": 0, "maxTokens": 12,
            "cache": False, **extra}


def mlx_vlm_text(model_dir: Path, images: list[bytes], max_tokens: int) -> tuple[str, int]:
    """mlx-vlm's own greedy generate for the same conversation: (text as the sidecar's detokenizer
    writes it, prompt tokens)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from PIL import Image

    model, processor = load(str(model_dir))
    prompt = apply_chat_template(processor, model.config, QUESTION, num_images=len(images))
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    tokens, prompt_tokens = [], 0
    for result in stream_generate(model, processor, prompt, image=pictures, max_tokens=max_tokens, temperature=0.0):
        tokens.append(result.token)
        prompt_tokens = result.prompt_tokens
    detokenizer = load_tokenizer(model_dir).detokenizer  # as the sidecar turns tokens into text
    detokenizer.reset()
    for token in tokens[:max_tokens]:  # its last result repeats the last token, with the finish reason
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text, prompt_tokens


def test_greedy_output_is_mlx_vlms_token_for_token_and_images_change_it(served: SidecarClient,
                                                                          vision_dir: Path) -> None:
    first, second = vision_models.image(1, 120, 90), vision_models.image(2, 120, 90)
    ours = served.request("chat", image_chat(data_url(first), maxTokens=16))
    text, prompt_tokens = mlx_vlm_text(vision_dir, [first], 16)
    assert ours["text"] == text
    assert ours["usage"]["promptTokens"] == prompt_tokens
    other = served.request("chat", image_chat(data_url(second), maxTokens=16))
    assert other["text"] != ours["text"]
    two = served.request("chat", image_chat(data_url(first), data_url(second), maxTokens=16))
    text, prompt_tokens = mlx_vlm_text(vision_dir, [first, second], 16)
    assert two["text"] == text and two["usage"]["promptTokens"] == prompt_tokens
    assert two["usage"]["imageTokens"] == ours["usage"]["imageTokens"] + other["usage"]["imageTokens"]


def test_a_second_architecture_gemma3_matches_mlx_vlm_too(served: SidecarClient, gemma_dir: Path) -> None:
    """Gemma 3: a SigLIP tower pooled to a fixed number of soft tokens per image, plain positions,
    sliding-window layers (its window, 16 tokens, is shorter than the prompt, which goes in 8
    tokens a step here)."""
    first, second = vision_models.image(1, 120, 90), vision_models.image(2, 90, 120)
    for images in ([first], [first, second]):
        ours = served.request("chat", dict(image_chat(*map(data_url, images), maxTokens=16),
                                           model=vision_models.GEMMA3_NAME))
        text, prompt_tokens = mlx_vlm_text(gemma_dir, images, 16)
        assert ours["text"] == text and ours["usage"]["promptTokens"] == prompt_tokens
        assert ours["usage"]["imageTokens"] == vision_models.GEMMA3_TOKENS_PER_IMAGE * len(images)


def test_the_prompt_grows_with_the_image_as_the_processor_says(served: SidecarClient) -> None:
    """Qwen2-VL: 14-pixel patches merged 2x2, so an image of w x h (multiples of 28 within the
    processor's pixel bounds) costs (w/28)*(h/28) tokens."""
    text_only = served.request("chat", image_chat())
    assert "imageTokens" not in text_only["usage"]
    for width, height in [(56, 56), (112, 56), (224, 112)]:
        result = served.request("chat", image_chat(data_url(vision_models.image(3, width, height))))
        expected = (width // 28) * (height // 28)
        assert result["usage"]["imageTokens"] == expected
        # the placeholder itself (one token) becomes the image's tokens, with its start and end markers
        assert result["usage"]["promptTokens"] - text_only["usage"]["promptTokens"] == expected + 2


def test_vision_is_a_capability_and_text_chats_work_on_a_vision_model(served: SidecarClient) -> None:
    listed = {m["model"]: m for m in served.request("models/list")["models"]}
    assert "vision" in listed[MODEL]["capabilities"]
    assert "vision" not in listed["demo"]["capabilities"]
    result = served.request("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                                     "maxTokens": 4, "temperature": 0})
    assert result["usage"]["completionTokens"] == 4
    status = {m["model"]: m for m in served.request("server/status")["models"]}
    assert "vision" in status[MODEL]["capabilities"]


def test_images_by_file_path_under_the_roots_and_the_response_cache_keys_on_their_bytes(
        served: SidecarClient, models_dir: Path) -> None:
    picture = vision_models.image(4, 84, 84)
    path = models_dir / "pictures" / "four.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(picture)
    by_url = served.request("chat", image_chat(data_url(picture), cache=True))
    by_path = served.request("chat", image_chat(str(path), cache=True))
    assert by_path.get("cached") is True and by_path["text"] == by_url["text"]
    by_file_url = served.request("chat", image_chat(f"file://{path}", cache=True))
    assert by_file_url.get("cached") is True
    path.write_bytes(vision_models.image(5, 84, 84))  # the same path, other bytes: not the cached answer
    changed = served.request("chat", image_chat(str(path), cache=True))
    assert not changed.get("cached") and changed["text"] != by_url["text"]


def test_a_json_schema_answer_and_stop_strings_hold_with_an_image(served: SidecarClient) -> None:
    url = data_url(vision_models.image(6, 56, 56))
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}}, "required": ["animal"],
              "additionalProperties": False}
    result = served.request("chat", image_chat(url, maxTokens=40, responseFormat={"type": "json_schema",
                                                                                    "schema": schema}))
    assert json.loads(result["text"])["animal"] in ("cat", "dog")
    free = served.request("chat", image_chat(url, maxTokens=12))
    stop = free["text"][3:6]
    stopped = served.request("chat", image_chat(url, maxTokens=12, stop=[stop]))
    assert stopped["finishReason"] == "stop_sequence" and stopped["text"] == free["text"][: free["text"].index(stop)]


def test_a_vision_request_streams_and_cancels(served: SidecarClient) -> None:
    url = data_url(vision_models.image(7, 112, 112))
    id_ = served.start_request("chat", image_chat(url, maxTokens=2000, stream=True))
    wait_until(lambda: len(chunks_of(served, id_)) >= 3)
    served.cancel(id_)
    result = served.wait_response(id_)["result"]
    assert result["finishReason"] == "cancelled"
    assert 3 <= result["usage"]["completionTokens"] < 2000


@pytest.mark.parametrize("when", ["encode", "prefill"])
def test_a_vision_request_cancelled_before_its_first_token_answers_cancelled(served: SidecarClient, when: str) -> None:
    """Cancelled while its images are encoded or its prompt goes in (8 tokens a step here): it ends
    there, with no token, and the model serves the next request."""
    images = [data_url(vision_models.image(10 + n, 224, 224)) for n in range(4)]
    token = f"cancel-{when}"
    id_ = served.start_request("chat", image_chat(*images, maxTokens=50, _meta={"progressToken": token}))
    if when == "prefill":  # past the encode step: its prompt is going in
        wait_until(lambda: any(r.message.get("method") == "$/progress" and r.message["params"]["token"] == token
                                    and r.message["params"]["phase"] == "prefill" for r in list(served.received)))
    served.cancel(id_)
    result = served.wait_response(id_)["result"]
    assert result["finishReason"] == "cancelled"
    assert served.request("chat", image_chat(images[0], maxTokens=2))["usage"]["completionTokens"] == 2


def test_a_text_chat_on_another_model_keeps_streaming_while_a_vision_request_prefills(served: SidecarClient) -> None:
    images = [data_url(vision_models.image(20 + n, 224, 224)) for n in range(4)]  # 4 x 64 tokens, 8 a step
    served.request("models/load", {"model": MODEL})
    text_id = served.start_request("chat", {"model": "demo", "messages": [{"role": "user", "content": "the sea"}],
                                            "maxTokens": 400, "temperature": 0, "stream": True, "cache": False})
    wait_until(lambda: len(chunks_of(served, text_id)) >= 1)
    vision_id = served.start_request("chat", image_chat(*images, maxTokens=4, stream=True))
    wait_until(lambda: len(chunks_of(served, vision_id)) >= 1)
    before_first_vision_token = len(chunks_of(served, text_id))
    served.wait_response(vision_id)
    served.cancel(text_id)
    served.wait_response(text_id)
    sent = next(i for i, r in enumerate(list(served.received)) if r.message.get("method") == "generate/chunk"
                and r.message["params"]["requestId"] == vision_id)
    text_during = [i for i, r in enumerate(list(served.received)[:sent]) if r.message.get("method") == "generate/chunk"
                   and r.message["params"]["requestId"] == text_id]
    assert before_first_vision_token >= 2 and len(text_during) >= 2


# ---- refused, before anything is loaded ---------------------------------------------------------


def refusal(client: SidecarClient, params: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(RpcCallError) as caught:
        client.request("chat", params)
    assert caught.value.code == -32602, caught.value.message
    return dict(caught.value.data or {}, message=caught.value.message)


def truncated_png() -> bytes:
    whole = vision_models.image(8, 200, 200)
    return whole[: len(whole) // 2]


BAD_IMAGES = {
    "not-an-image": lambda tmp: data_url(b"this is text, not pixels"),
    "empty": lambda tmp: "data:image/png;base64,",
    "truncated": lambda tmp: data_url(truncated_png()),
    "unsupported-format": lambda tmp: data_url(vision_models.image(9, 30, 30, "TIFF"), "image/tiff"),
    "bad-data-url": lambda tmp: "data:image/png;base64,@@@not base64@@@",
    "outside-roots": lambda tmp: str(tmp / "secret.png"),
    "urls-not-allowed": lambda tmp: "https://example.com/cat.png",
    "not-found": lambda tmp: "{models}/pictures/missing.png",
}


@pytest.fixture(scope="module")
def strict(vision_dir: Path, sidecar_env: dict[str, str]):
    """A sidecar with small image limits, the vision model never loaded by any test but the last."""
    from tests.conftest import serving

    with serving(dict(sidecar_env, LOCALMLX_MAX_IMAGE_BYTES="200K", LOCALMLX_MAX_IMAGE_PIXELS="40000")) as client:
        yield client


@pytest.mark.parametrize("reason", sorted(BAD_IMAGES))
def test_a_bad_image_is_refused_with_its_reason_and_nothing_is_loaded(strict: SidecarClient, reason: str,
                                                                       tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "secret.png").write_bytes(vision_models.image(1, 28, 28))
    image = BAD_IMAGES[reason](tmp_path).replace("{models}", str(models_dir))
    data = refusal(strict, image_chat(data_url(vision_models.image(1, 28, 28)), image))
    assert data["reason"] == reason, data
    assert data["path"] == "/messages/0/content/2"
    loaded = [m["model"] for m in strict.request("server/status")["models"]]
    assert MODEL not in loaded


def test_limits_on_bytes_and_pixels(strict: SidecarClient) -> None:
    big = vision_models.image(11, 400, 400)  # about 480 KB of noise: over 200K
    assert refusal(strict, image_chat(data_url(big)))["reason"] == "too-many-bytes"
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buffer, format="PNG")  # small file, 90,000 pixels: over 40,000
    data = refusal(strict, image_chat(data_url(buffer.getvalue())))
    assert data["reason"] == "too-many-pixels" and data["width"] == 300


def test_a_text_model_given_an_image_names_itself(strict: SidecarClient) -> None:
    params = dict(image_chat(data_url(vision_models.image(1, 28, 28))), model="demo")
    data = refusal(strict, params)
    assert data["reason"] == "no-vision" and data["model"] == "demo" and "demo" in data["message"]
    text_parts = {"model": "demo", "maxTokens": 3, "temperature": 0,
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "the"},
                                                            {"type": "text", "text": "sea"}]}]}
    assert strict.request("chat", text_parts)["usage"]["completionTokens"] == 3  # text parts alone are text


def test_concurrent_bad_and_good_requests_leave_the_sidecar_serving(strict: SidecarClient) -> None:
    good = image_chat(data_url(vision_models.image(2, 56, 56)), maxTokens=3)
    errors: list[int] = []

    def bad() -> None:
        try:
            strict.request("chat", image_chat(data_url(b"nope")))
        except RpcCallError as error:
            errors.append(int(error.code))

    threads = [threading.Thread(target=bad) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert strict.request("chat", good)["usage"]["completionTokens"] == 3
    for thread in threads:
        thread.join()
    assert errors == [-32602] * 4


def test_a_vision_model_loads_keeps_alive_unloads_and_deletes_as_a_text_model_does(
        served: SidecarClient, vision_dir: Path, models_dir: Path) -> None:
    import shutil

    copy = models_dir / "qwen2-vl-copy"
    shutil.copytree(vision_dir, copy, dirs_exist_ok=True)
    loaded = served.request("models/load", {"model": copy.name})
    assert "vision" in loaded["capabilities"] and loaded["bytes"] > 0
    status = served.request("server/status")
    assert status["memory"]["modelBytes"] >= loaded["bytes"]
    url = data_url(vision_models.image(30, 56, 56))
    served.request("chat", dict(image_chat(url, maxTokens=2), model=copy.name, keepAlive=0))
    wait_until(lambda: copy.name not in [m["model"] for m in served.request("server/status")["models"]])
    served.request("chat", dict(image_chat(url, maxTokens=2), model=copy.name))  # loads it again, on demand
    served.request("models/delete", {"model": copy.name, "force": True})
    assert not copy.exists()
    assert copy.name not in [m["model"] for m in served.request("models/list")["models"]]


def test_model_auto_sends_a_request_with_images_to_a_profile_whose_model_sees(
        sidecars, vision_dir: Path, tmp_path: Path) -> None:
    client = sidecars.spawn(LOCALMLX_PROFILES_DIR=str(tmp_path / "profiles"))
    client.request("profiles/save", {"name": "words", "profile": {"model": "demo", "tasks": ["chat"]}})
    client.request("profiles/save", {"name": "eyes", "profile": {"model": MODEL, "tasks": ["summarize"]}})
    text = client.request("chat", {"model": "auto", "task": "chat", "maxTokens": 2, "cache": False,
                                   "messages": [{"role": "user", "content": "the sea"}]})
    assert text["profile"] == "words"  # declares the task
    seen = client.request("chat", dict(image_chat(data_url(vision_models.image(1, 56, 56))), model="auto", task="chat"))
    assert seen["profile"] == "eyes" and seen["usage"]["imageTokens"] == 4
    assert {"profile": "words", "score": None, "note": "does not take images"} in seen["routedBy"]["candidates"]
    client.request("profiles/delete", {"name": "eyes"})
    with pytest.raises(RpcCallError) as none:
        client.request("chat", dict(image_chat(data_url(vision_models.image(1, 56, 56))), model="auto"))
    assert none.value.code == -32602 and "no profile can serve" in none.value.message
    assert client.close() == 0


def test_image_urls_are_fetched_only_when_allowed_and_a_failed_fetch_says_so(sidecars, vision_dir: Path) -> None:
    import http.server
    import socket

    picture = vision_models.image(40, 56, 56)

    class OnePicture(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(picture)))
            self.end_headers()
            self.wfile.write(picture)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), OnePicture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    try:
        client = sidecars.spawn(LOCALMLX_ALLOW_IMAGE_URLS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        url = f"http://127.0.0.1:{server.server_address[1]}/picture.png"
        fetched = client.request("chat", image_chat(url, cache=True))
        inline = client.request("chat", image_chat(data_url(picture), cache=True))
        assert fetched["usage"]["imageTokens"] == 4 and inline.get("cached") is True  # the same bytes
        data = refusal(client, image_chat(f"http://127.0.0.1:{closed}/gone.png"))
        assert data["reason"] == "fetch-failed" and data["path"] == "/messages/0/content/1"
        assert client.close() == 0
    finally:
        server.shutdown()


def test_too_many_images_and_a_draft_model_on_a_vision_model_are_refused(served: SidecarClient) -> None:
    url = data_url(vision_models.image(41, 28, 28))
    data = refusal(served, image_chat(*[url] * 33))
    assert data["reason"] == "too-many-images" and data["maxImages"] == 32
    data = refusal(served, image_chat(url, draftModel="demo"))
    assert data["errors"][0]["path"] == "/draftModel"
    assert served.request("chat", image_chat(url, maxTokens=2))["usage"]["completionTokens"] == 2
