"""`/image PATH` in the REPL: images queued for the next chat turn, sent as data: URLs before the
turn's text, kept in the conversation as sent; scripted against the real sidecar, with the demo
model (text only: the images are refused and stay queued) and the tiny Qwen2-VL
(tests/vision_models.py), and the pieces on their own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.protocol_defs import INVALID_PARAMS
from sidecar.repl.images import data_url, image_paths, media_type, read_image, user_content
from sidecar.repl.output import wire_text
from sidecar.repl.prompt import candidates, matching
from sidecar.repl.state import ReplState

from .vision_models import NAME as VISION_MODEL
from .vision_models import image

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = "from sidecar.repl import main; raise SystemExit(main())"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-repl-models")  # the demo model is built here by the sidecar


@pytest.fixture
def env(models_dir, tmp_path) -> dict[str, str]:
    return {**os.environ, "LOCALMLX_MODELS_DIR": str(models_dir),
            "LOCALMLX_REPL_HISTORY": str(tmp_path / "history"),
            "LOCALMLX_MAX_TOKENS": "8", "LOCALMLX_TEMPERATURE": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def pictures(tmp_path) -> dict[str, Path]:
    """Images outside the sidecar's allowed roots, as a user's own files are."""
    folder = tmp_path / "my pictures"
    folder.mkdir()
    paths = {"png": folder / "sea.png", "jpeg": folder / "hills at dusk.jpg"}
    paths["png"].write_bytes(image(1, 64, 48))
    paths["jpeg"].write_bytes(image(2, 40, 40, "JPEG"))
    return paths


def script(env: dict[str, str], lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=REPO_ROOT, env=env, text=True,
                          input="".join(line + "\n" for line in lines), capture_output=True, timeout=100)


def traffic(stdout: str, arrow: str) -> list[dict]:
    """The messages `/raw on` showed going one way (→ sent, ← received)."""
    return [json.loads(line[2:]) for line in stdout.splitlines() if line.startswith(arrow + " ")]


def url_of(path: Path, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


# ---- the pieces ----------------------------------------------------------------------------


def test_an_image_is_read_when_queued_and_goes_out_as_a_data_url(pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    queued = read_image("~/my pictures/sea.png")
    assert queued.path == pictures["png"] and queued.path.is_absolute()
    assert queued.url == url_of(pictures["png"], "image/png")
    assert queued.describe() == f"sea.png ({queued.size / 1024:.1f} KiB)"
    monkeypatch.chdir(tmp_path / "my pictures")
    assert read_image("hills at dusk.jpg").url.startswith("data:image/jpeg;base64,/9j/")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, why in (("nowhere.png", "no such file"), ("empty.png", "empty"), ("my pictures", "a directory")):
        with pytest.raises(ValueError, match=why):
            read_image(str(tmp_path / name))
    with pytest.raises(ValueError, match=r"too large to send .* LOCALMLX_MAX_LINE_BYTES"):
        read_image(str(pictures["png"]), max_url_bytes=1000)


def test_the_media_type_comes_from_the_bytes_then_the_name():
    assert media_type(image(3, 8, 8, "WEBP"), Path("x.bin")) == "image/webp"
    assert media_type(image(3, 8, 8, "GIF"), Path("x.bin")) == "image/gif"
    assert media_type(image(3, 8, 8, "BMP"), Path("x.png")) == "image/bmp"
    assert media_type(b"II*\x00", Path("scan.tiff")) == "image/tiff"  # the sidecar says whether it reads it
    assert media_type(b"hello", Path("notes.txt")) == "application/octet-stream"
    assert data_url(b"\x00\x01", "image/png") == "data:image/png;base64,AAE="


def test_paths_as_typed_quoted_or_escaped(pictures, monkeypatch):
    monkeypatch.chdir(pictures["png"].parent)
    assert image_paths("hills at dusk.jpg") == ["hills at dusk.jpg"]  # spaces and all: the file exists
    assert image_paths("'hills at dusk.jpg' sea.png") == ["hills at dusk.jpg", "sea.png"]
    assert image_paths(r"hills\ at\ dusk.jpg") == ["hills at dusk.jpg"]  # as a terminal pastes a dropped file
    assert image_paths("'unclosed.png") == ["'unclosed.png"]


def test_the_turn_is_the_images_then_the_text_and_the_conversation_keeps_it(pictures):
    state = ReplState()
    assert state.user_turn("hi") == "hi"
    state.images = [read_image(str(pictures["png"])), read_image(str(pictures["jpeg"]))]
    turn = state.user_turn("What is this?")
    assert turn == user_content(state.images, "What is this?")
    assert [part["type"] for part in turn] == ["image", "image", "text"]
    assert turn[0]["image"] == state.images[0].url and turn[2]["text"] == "What is this?"
    assert state.chat_params(turn, keep_history=True)["messages"] == [{"role": "user", "content": turn}]
    state.conversation.add(turn, "A picture.")
    assert state.conversation.messages(None, "More?")[0]["content"] is turn  # as sent


def test_traffic_shows_a_data_url_shortened_and_still_json(pictures):
    url = read_image(str(pictures["png"])).url
    message = {"method": "chat", "params": {"messages": [{"role": "user", "content": [
        {"type": "image", "image": url}, {"type": "text", "text": "hi"}]}]}}
    for shown in (wire_text(json.dumps(message).encode() + b"\n"), wire_text(message)):
        part = json.loads(shown)["params"]["messages"][0]["content"][0]["image"]
        assert part.startswith(url[:46] + "…[") and part.endswith(" more base64 characters]")
        assert len(shown) < 300
    assert wire_text({"image": "data:image/png;base64,AAE="}) == '{"image":"data:image/png;base64,AAE="}'


def test_image_paths_complete(pictures, monkeypatch):
    folder = pictures["png"].parent
    (folder / ".hidden.png").write_bytes(b"x")
    (folder / "sub").mkdir()
    state = ReplState()
    assert matching(*candidates(f"/image {folder}/", state)) == [
        f"{folder}/hills at dusk.jpg", f"{folder}/sea.png", f"{folder}/sub/"]
    assert matching(*candidates(f"/image {folder}/.h", state)) == [f"{folder}/.hidden.png"]
    assert matching(*candidates(f"/image {folder}/hills a", state)) == [f"{folder}/hills at dusk.jpg"]
    monkeypatch.chdir(folder)
    assert matching(*candidates("/image se", state)) == ["sea.png"]
    assert matching(*candidates("/image sea.png s", state)) == ["sea.png", "sub/"]  # the last word completes
    assert matching(*candidates("/image /no/such/dir/x", state)) == []
    assert "/image" in matching(*candidates("/im", state))


# ---- scripted, against the sidecar ---------------------------------------------------------


def test_script_images_are_queued_listed_sent_first_and_kept_when_refused(env, pictures):
    png, jpeg = pictures["png"], pictures["jpeg"]
    done = script(env, ["/image", f"/image {png}", f"/image '{jpeg}' '{png.parent}/missing.png'", "/image", "/show",
                        "/raw on", "Describe them.", "/raw off", "/image clear", "/image", "/raw on", "Plain text."])
    assert done.returncode == 1, done.stderr  # the missing file, the refusal
    assert "no images queued: /image PATH adds one to the next message" in done.stdout
    assert re.search(r"^image queued: sea\.png \([\d.]+ KiB\)$", done.stderr, re.M)
    assert re.search(r"^image queued: hills at dusk\.jpg \([\d.]+ KiB\); 2 for the next message$",
                     done.stderr, re.M)
    assert f"error: /image: {png.parent}/missing.png: no such file" in done.stderr
    assert re.search(rf"^1\. {re.escape(str(png))} \([\d.]+ KiB\)\n2\. {re.escape(str(jpeg))} ", done.stdout, re.M)
    assert "queued for the next message: 2 images" in done.stdout
    chats = [m for m in traffic(done.stdout, "→") if m.get("method") == "chat"]
    assert len(chats) == 2
    # The view elides the base64; what went out is checked on the request's shape.
    first = chats[0]["params"]["messages"]
    assert [m["role"] for m in first] == ["user"]
    parts = first[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"] and parts[2]["text"] == "Describe them."
    assert parts[0]["image"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert parts[1]["image"].startswith("data:image/jpeg;base64,/9j/")
    # The demo model is text-only: refused before anything runs, and the images wait.
    refusal = next(m for m in traffic(done.stdout, "←") if m.get("id") == chats[0]["id"])
    assert refusal["error"]["code"] == INVALID_PARAMS and refusal["error"]["data"]["reason"] == "no-vision"
    assert "2 images still queued (/image clear drops them)" in done.stderr
    assert "dropped 2 images" in done.stderr
    assert chats[1]["params"]["messages"] == [{"role": "user", "content": "Plain text."}]


@pytest.fixture(scope="session")
def vision_models_dir(tmp_path_factory) -> Path:
    pytest.importorskip("mlx_vlm")
    from .vision_models import build

    folder = tmp_path_factory.mktemp("vision-models")
    build(folder)
    return folder


def test_script_an_image_goes_to_a_vision_model_and_stays_in_the_conversation(env, vision_models_dir, pictures):
    env = {**env, "LOCALMLX_MODELS_DIR": str(vision_models_dir)}
    png = pictures["png"]
    saved = png.parent / "conversation.json"
    done = script(env, ["/models", f"/image {png}", "/raw on", "What is in the picture?", "And now?", "/raw off",
                        f"/save '{saved}'"], "--model", VISION_MODEL)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^{VISION_MODEL}\s.*qwen2_vl, vision", done.stdout, re.M)
    chats = [m for m in traffic(done.stdout, "→") if m.get("method") == "chat"]
    received = {m.get("id"): m for m in traffic(done.stdout, "←") if "id" in m}
    first, second = (received[chat["id"]]["result"] for chat in chats)
    assert first["usage"]["imageTokens"] > 0 and first["usage"]["promptTokens"] > first["usage"]["imageTokens"]
    assert "imageTokens" in second["usage"]  # the image is still in the conversation
    assert re.search(rf"· {first['usage']['imageTokens']} of the prompt's from images ·", done.stderr)
    turns = json.loads(saved.read_text())
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == [{"type": "image", "image": url_of(png, "image/png")},
                                   {"type": "text", "text": "What is in the picture?"}]
    streamed = "".join(m["params"].get("text", "") for m in traffic(done.stdout, "←")
                       if m.get("method") == "generate/chunk" and m["params"]["requestId"] == chats[0]["id"])
    assert turns[1]["content"] == streamed and turns[2]["content"] == "And now?"
    sent_again = chats[1]["params"]["messages"][0]["content"]
    assert [p["type"] for p in sent_again] == ["image", "text"]  # the history, as sent
