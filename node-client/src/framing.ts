/**
 * NDJSON framing: bytes in, lines out; messages in, one line out.
 *
 * Lines are split on the newline byte before anything is decoded, so a multi-byte character
 * split across reads survives. Each line is capped: an oversized one is reported once, as soon as
 * it passes the cap, and the rest of it is dropped up to its newline; the stream then goes on.
 */

/** A line that passed the size cap: its head is kept, to recover a request id. */
export interface OversizedLine {
  readonly oversized: true;
  readonly head: Buffer;
  readonly limit: number;
}

export type Frame = Buffer | OversizedLine;

const NEWLINE = 0x0a;
const CARRIAGE_RETURN = 0x0d;
const HEAD_BYTES = 4096;

export function isOversized(frame: Frame): frame is OversizedLine {
  return !Buffer.isBuffer(frame);
}

export class LineSplitter {
  private parts: Buffer[] = [];
  private buffered = 0;
  private discarding = false;

  constructor(readonly maxLineBytes: number) {}

  /** The complete lines in `chunk` (plus what was buffered before), without their `\n`. */
  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let start = 0;
    let end: number;
    while ((end = chunk.indexOf(NEWLINE, start)) >= 0) {
      if (this.discarding) {
        this.discarding = false;
      } else {
        this.take(this.join(chunk.subarray(start, end)), frames);
      }
      this.parts = [];
      this.buffered = 0;
      start = end + 1;
    }
    if (start < chunk.length && !this.discarding) {
      this.parts.push(chunk.subarray(start));
      this.buffered += chunk.length - start;
      if (this.buffered > this.maxLineBytes) {
        frames.push({ oversized: true, head: this.join(Buffer.alloc(0)).subarray(0, HEAD_BYTES), limit: this.maxLineBytes });
        this.parts = [];
        this.buffered = 0;
        this.discarding = true;
      }
    }
    return frames;
  }

  /** At end of input: an unterminated last line still counts. */
  end(): Frame[] {
    const frames: Frame[] = [];
    if (!this.discarding && this.buffered > 0) this.take(this.join(Buffer.alloc(0)), frames);
    this.parts = [];
    this.buffered = 0;
    this.discarding = false;
    return frames;
  }

  private join(tail: Buffer): Buffer {
    if (this.parts.length === 0) return tail;
    return Buffer.concat([...this.parts, tail], this.buffered + tail.length);
  }

  private take(line: Buffer, frames: Frame[]): void {
    if (line.length > 0 && line[line.length - 1] === CARRIAGE_RETURN) line = line.subarray(0, -1);
    if (line.length > this.maxLineBytes) {
      frames.push({ oversized: true, head: line.subarray(0, HEAD_BYTES), limit: this.maxLineBytes });
    } else if (!isBlank(line)) {
      frames.push(line);
    }
  }
}

function isBlank(line: Buffer): boolean {
  for (const byte of line) {
    if (byte !== 0x20 && byte !== 0x09 && byte !== CARRIAGE_RETURN) return false;
  }
  return true;
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** The JSON value on one line; throws on invalid UTF-8 or invalid JSON. */
export function parseLine(line: Buffer): unknown {
  return JSON.parse(strictUtf8.decode(line));
}

/** One wire line: compact JSON plus `\n`. JSON.stringify escapes lone surrogates, so the line is valid UTF-8. */
export function encodeMessage(message: unknown): string {
  return `${JSON.stringify(message)}\n`;
}

const ID_VALUE = /^\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null)/;

/**
 * Best-effort id of a message whose line was too long to parse: the top-level "id" key in its
 * head, so the request it answers can fail at once instead of waiting for its timeout.
 */
export function peekId(head: Buffer): string | number | null | undefined {
  const text = head.toString("utf8");
  let depth = 0;
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      const match = /^"(?:[^"\\]|\\.)*"/.exec(text.slice(i));
      if (match === null) return undefined;
      const end = i + match[0].length;
      if (depth === 1 && expectKey && match[0] === '"id"') {
        const value = ID_VALUE.exec(text.slice(end));
        if (value === null) return undefined;
        const parsed: unknown = JSON.parse(value[1]!);
        return typeof parsed === "string" || typeof parsed === "number" || parsed === null ? parsed : undefined;
      }
      expectKey = false;
      i = end - 1;
    } else if (c === "{" || c === "[") {
      depth++;
      expectKey = c === "{" && depth === 1;
    } else if (c === "}" || c === "]") {
      depth--;
    } else if (c === "," && depth === 1) {
      expectKey = true;
    }
  }
  return undefined;
}

/** The last `limit` bytes of a byte stream (the sidecar's stderr), for error reports. */
export class ByteTail {
  private parts: Buffer[] = [];
  private size = 0;

  constructor(readonly limit: number) {}

  push(chunk: Buffer): void {
    this.parts.push(chunk);
    this.size += chunk.length;
    while (this.parts.length > 1 && this.size - this.parts[0]!.length >= this.limit) {
      this.size -= this.parts.shift()!.length;
    }
  }

  toString(): string {
    let bytes = Buffer.concat(this.parts, this.size);
    if (bytes.length > this.limit) {
      bytes = bytes.subarray(bytes.length - this.limit);
      let skip = 0; // do not start in the middle of a UTF-8 character
      while (skip < 3 && skip < bytes.length && (bytes[skip]! & 0xc0) === 0x80) skip++;
      bytes = bytes.subarray(skip);
    }
    return bytes.toString("utf8");
  }
}
