"""Images in messages: found, read and checked before any model is loaded.

An image part names its image by a data: URL, a file path under the allowed roots, or an
http(s) URL that is fetched only when LOCALMLX_ALLOW_IMAGE_URLS is set (the sidecar never
reaches out on its own). Every image is decoded here, on a worker thread, so a broken one is
refused with its reason before the request costs anything; the decoded picture goes on to the
model's processor, its digest into the response cache's key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParams, RpcError
from ..hub import ModelLocator
from ..settings import Settings

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow decodes and vision processors expect
MAX_IMAGES = 32  # per request: each one is encoded by the vision tower before the first token
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MessageImage:
    path: str  # where it is in the request: /messages/<i>/content/<j>
    digest: str  # sha256 of its bytes: the response cache's key holds this, not the reference
    picture: Any  # PIL.Image.Image, RGB
    format: str

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.picture.size
        return int(width), int(height)


def image_refs(messages: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """(path in params, reference) of every image part, in order."""
    refs: list[tuple[str, str]] = []
    for i, message in enumerate(messages or ()):
        content = message.get("content")
        if isinstance(content, list):
            refs.extend((f"/messages/{i}/content/{j}", part["image"])
                        for j, part in enumerate(content) if part.get("type") == "image")
    return refs


def refused(path: str, reason: str, message: str, **data: Any) -> InvalidParams:
    return InvalidParams(f"Image at {path}: {message}", errors=[{"path": path, "message": message}],
                         path=path, reason=reason, **data)


def read_images(settings: Settings, hub: ModelLocator, messages: list[dict[str, Any]] | None) -> list[MessageImage]:
    """Every image of `messages`, read and decoded; -32602 with its reason for the first bad one."""
    refs = image_refs(messages)
    if len(refs) > MAX_IMAGES:
        raise refused(refs[MAX_IMAGES][0], "too-many-images", f"at most {MAX_IMAGES} images per request",
                      maxImages=MAX_IMAGES)
    return [decode(path, read_bytes(settings, hub, path, ref), settings.max_image_pixels) for path, ref in refs]


def read_bytes(settings: Settings, hub: ModelLocator, path: str, ref: str) -> bytes:
    limit = settings.max_image_bytes
    if ref.startswith("data:"):
        data = _data_url(path, ref, limit)
    elif ref.startswith(("http://", "https://")):
        if not settings.allow_image_urls:
            raise refused(path, "urls-not-allowed", "image URLs are not fetched unless LOCALMLX_ALLOW_IMAGE_URLS "
                          "is set; send the image as a data: URL or a file path")
        data = _fetch(path, ref, limit)
    elif "://" in ref[:16] and not ref.startswith("file://"):
        raise refused(path, "urls-not-allowed", "an image is a data: URL, a file path or an http(s) URL")
    else:
        data = _file(hub, path, ref, limit)
    if not data:
        raise refused(path, "empty", "the image is empty (0 bytes)")
    return data


def _too_big(path: str, size: int, limit: int) -> InvalidParams:
    return refused(path, "too-many-bytes", f"the image has {size} bytes, more than the {limit} allowed "
                   "(LOCALMLX_MAX_IMAGE_BYTES)", bytes=size, maxBytes=limit)


def _data_url(path: str, ref: str, limit: int) -> bytes:
    header, comma, payload = ref.partition(",")
    if not comma:
        raise refused(path, "bad-data-url", "a data: URL needs a comma before its data")
    if not header.endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        if len(payload) * 3 // 4 > limit + 2:  # refused before it is decoded
            raise _too_big(path, len(payload) * 3 // 4, limit)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise refused(path, "bad-data-url", "the data: URL's base64 does not decode") from None
    if len(data) > limit:
        raise _too_big(path, len(data), limit)
    return data


def _fetch(path: str, url: str, limit: int) -> bytes:
    import urllib.error  # here: urllib.request imports http.client and ssl, which start-up need not wait for
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "localmlx"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data: bytes = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise refused(path, "fetch-failed", f"could not fetch the image: {exc}"[:300]) from None
    if len(data) > limit:
        raise _too_big(path, len(data), limit)
    return data


def _file(hub: ModelLocator, path: str, ref: str, limit: int) -> bytes:
    name = urllib.parse.unquote(ref[len("file://"):]) if ref.startswith("file://") else ref
    try:
        resolved = hub.inside_roots(name, field="image")
    except RpcError:  # one answer whether or not it exists (see Hub.inside_roots)
        raise refused(path, "outside-roots", "the file is outside the allowed roots (LOCALMLX_ALLOWED_ROOTS)",
                      allowedRoots=[str(r) for r in hub.allowed_roots]) from None
    try:
        size = resolved.stat().st_size
        if size > limit:
            raise _too_big(path, size, limit)
        with open(resolved, "rb") as f:
            return f.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise refused(path, "not-found", f"no image file at {Path(name)}") from None
    except PermissionError:
        raise refused(path, "not-found", f"the image file {Path(name)} cannot be read") from None


def decode(path: str, data: bytes, max_pixels: int) -> MessageImage:
    """The picture in `data`, fully decoded (a truncated file fails here, not in the model)."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise refused(path, "not-an-image", "the bytes are not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise refused(path, "too-many-pixels", "the image has far too many pixels", maxPixels=max_pixels) from None
    if picture.format not in FORMATS:
        raise refused(path, "unsupported-format", f"{picture.format} images are not supported "
                      f"({', '.join(FORMATS)} are)", format=picture.format)
    width, height = picture.size
    if width * height > max_pixels:
        raise refused(path, "too-many-pixels", f"the image is {width}x{height}, more than {max_pixels} pixels "
                      "(LOCALMLX_MAX_IMAGE_PIXELS)", width=width, height=height, maxPixels=max_pixels)
    if width == 0 or height == 0:
        raise refused(path, "empty", "the image has no pixels")
    try:
        picture.load()  # the first frame of an animation
        rgb = picture.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "not-an-image"
        raise refused(path, reason, f"the image does not decode: {exc}"[:300]) from None
    return MessageImage(path, hashlib.sha256(data).hexdigest(), rgb, str(picture.format))
