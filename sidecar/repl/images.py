"""Images for the next chat turn (`/image PATH`).

The REPL runs beside the user's own files, which need not lie under the sidecar's allowed
roots: each image is read when it is queued (so a missing file is an error at once) and goes
out as a `data:` URL, never as a path. The turn's content is then the images, then the text,
as Qwen-VL's and mlx-vlm's chat templates expect; the conversation keeps it as sent.
"""

from __future__ import annotations

import base64
import mimetypes
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import formatting as fmt

Content = str | list[dict[str, Any]]  # a user turn: text alone, or content parts

# What the bytes say they are; the sidecar decides whether it can read them.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


@dataclass(frozen=True)
class QueuedImage:
    path: Path
    size: int
    url: str  # data:image/...;base64,...

    def describe(self) -> str:
        """`photo.png (123.4 KiB)`"""
        return f"{self.path.name} ({fmt.size(self.size)})"


def media_type(data: bytes, path: Path) -> str:
    """The image's type from its first bytes, else from its name (an unknown one is left for
    the sidecar to refuse with its own reason)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def read_image(text: str, max_url_bytes: int | None = None) -> QueuedImage:
    """The file `text` names (`~` expanded, made absolute), read now; ValueError saying why not.
    `max_url_bytes`: the sidecar's line limit, which a data URL must leave room under."""
    path = Path(text).expanduser().absolute()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not an image") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if not data:
        raise ValueError(f"{path}: empty")
    url = data_url(data, media_type(data, path))
    if max_url_bytes is not None and len(url) >= max_url_bytes:
        raise ValueError(f"{path}: too large to send ({fmt.size(len(data))}; as a data URL it passes the "
                         f"sidecar's {fmt.size(max_url_bytes)} message limit, LOCALMLX_MAX_LINE_BYTES)")
    return QueuedImage(path, len(data), url)


def image_paths(arg: str) -> list[str]:
    """What follows `/image`: one path as typed (spaces and all) when that file exists, else
    the shell words (quoted or escaped paths, as a terminal pastes a dropped file)."""
    text = arg.strip()
    if Path(text).expanduser().exists():
        return [text]
    try:
        return shlex.split(text) or [text]
    except ValueError:  # an unclosed quote: the line as typed
        return [text]


def user_content(images: list[QueuedImage], text: str) -> Content:
    """A user turn: the text alone, or the images first, then the text."""
    if not images:
        return text
    return [*({"type": "image", "image": image.url} for image in images), {"type": "text", "text": text}]

