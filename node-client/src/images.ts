/**
 * Images in chat messages, for models with the "vision" capability: `imagePart` turns a file path
 * or an image's bytes into the `ImagePart` a message's `content` array carries.
 */
import { isAbsolute, resolve } from "node:path";
import type { ImagePart, TextPart } from "./protocol";

/** What the sidecar reads itself: a data: URL, an http(s) URL (when it allows them), or a file:// URL. */
const URL_FORMS = /^(?:data:|https?:\/\/|file:\/\/)/i;

/** The formats the sidecar accepts, by their first bytes. */
const SIGNATURES: ReadonlyArray<[mime: string, matches: (bytes: Uint8Array) => boolean]> = [
  ["image/png", (b) => startsWith(b, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])],
  ["image/jpeg", (b) => startsWith(b, [0xff, 0xd8, 0xff])],
  ["image/gif", (b) => startsWith(b, [0x47, 0x49, 0x46, 0x38])],
  ["image/webp", (b) => startsWith(b, [0x52, 0x49, 0x46, 0x46]) && startsWith(b.subarray(8), [0x57, 0x45, 0x42, 0x50])],
  ["image/bmp", (b) => startsWith(b, [0x42, 0x4d])],
];

function startsWith(bytes: Uint8Array, prefix: readonly number[]): boolean {
  return bytes.length >= prefix.length && prefix.every((byte, i) => bytes[i] === byte);
}

/** The image's MIME type by its first bytes (PNG, JPEG, GIF, WebP, BMP); undefined when none of those. */
function sniffImageType(bytes: Uint8Array): string | undefined {
  return SIGNATURES.find(([, matches]) => matches(bytes))?.[0];
}

/**
 * An image for a message's `content` array:
 * - bytes (a `Buffer` or `Uint8Array`) become a `data:` URL, typed `mime`, else by their first
 *   bytes (PNG, JPEG, GIF, WebP, BMP), else `image/png` (the sidecar decodes the bytes whatever
 *   the label says, and names what they are not);
 * - a `data:`, `http(s)://` or `file://` URL is passed on as it is (the sidecar fetches http(s)
 *   URLs only when `LOCALMLX_ALLOW_IMAGE_URLS` is set);
 * - any other string is a file path, made absolute against this process's working directory (the
 *   sidecar has its own); the sidecar reads it when it lies under `LOCALMLX_ALLOWED_ROOTS` (the
 *   models dir counts as one).
 *
 *   mlx.chat({ model: "mlx-community/Qwen2-VL-2B-Instruct-4bit", messages: [
 *     { role: "user", content: [imagePart("./photo.jpg"), { type: "text", text: "What is in this photo?" }] },
 *   ] });
 */
export function imagePart(image: string | Uint8Array, mime?: string): ImagePart {
  if (typeof image !== "string") {
    const bytes = Buffer.from(image.buffer, image.byteOffset, image.byteLength);
    const type = mime ?? sniffImageType(bytes) ?? "image/png";
    return { type: "image", image: `data:${type};base64,${bytes.toString("base64")}` };
  }
  if (image === "") throw new TypeError("imagePart needs a file path, a URL or the image's bytes");
  if (URL_FORMS.test(image)) return { type: "image", image };
  return { type: "image", image: isAbsolute(image) ? image : resolve(image) };
}

/** A text part, beside images in a message's `content` array. */
export function textPart(text: string): TextPart {
  return { type: "text", text };
}

