"""Read a fine-tuning dataset and check every record before training starts.

The dataset is one of:

- a ``.jsonl`` file: all its records, split into training and validation sets by ``validationSplit``;
- a folder holding ``train.jsonl`` and optionally ``valid.jsonl``, the validation set as is (without it,
  the training records are split by ``validationSplit``); ``test.jsonl`` is ignored;
- any other folder: a folder of notes, turned into ``text`` records by the rule below.

JSONL records take one of mlx-lm's formats, set by the first record: ``{"prompt": ..., "completion": ...}``
(completions), ``{"messages": [...], "tools": [...]}`` (chat; ``tools`` optional) or ``{"text": ...}``.
Every record must have the first one's format, and at most ``maxSeqLength`` tokens as mlx-lm tokenizes it
(through the chat template for chat and completions). Blank lines are skipped. A split sets aside a seeded
random choice of round(n × validationSplit) records, and at least ``batchSize``, for validation; the rest
keep their order. Files over 1 GiB and folders of over 100,000 notes are refused.

Notes: every ``*.md``, ``*.markdown`` and ``*.txt`` file under the folder, recursively, in the order of
their relative paths; hidden files and folders (names starting with ".") are skipped, and so are linked
folders and links to files outside the folder. Each note is split into paragraphs at blank lines (spaces
at line ends are dropped). Paragraphs are packed greedily, in order, into chunks of at most
``maxSeqLength`` tokens, counting the heading ``# <relative path without extension>`` and the blank line
that start every chunk. A paragraph too long for a chunk of its own is split at line ends, a line still
too long at spaces, and a single word still too long into the longest pieces that fit. Each chunk becomes
``{"text": "# <title>\\n\\n<chunk>"}``. Notes holding only whitespace are skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidParams, brief

MAX_FILE_BYTES = 1 << 30  # a JSONL file or a note
MAX_NOTES = 100_000
NOTE_SUFFIXES = (".md", ".markdown", ".txt")
ROLES = ("system", "user", "assistant", "tool")
# A note is split at blank lines, then at line ends, then at spaces.
SEPARATORS = ("\n\n", "\n", " ")


@dataclass(frozen=True)
class Records:
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    format: str  # "chat" | "completions" | "text"
    source: str  # "jsonl" | "folder" | "notes"
    files: list[str]  # the files read (absolute paths)


def dataset_error(file: Path, line: int | None, reason: str, name: str | None = None) -> InvalidParams:
    where = name or file.name
    return InvalidParams(f"{where}: {reason}" if line is None else f"{where} line {line}: {reason}",
                         file=str(file), line=line, reason=reason, errors=[{"path": "/dataset", "message": reason}])


def read_dataset(source: Path, tokenizer: Any, *, max_seq_length: int, validation_split: float,
                 seed: int, batch_size: int) -> Records:
    source = Path(source).expanduser().absolute()
    if not 0 <= validation_split < 1:
        raise dataset_error(source, None, f"validationSplit must be at least 0 and below 1, not {validation_split}")
    if not source.exists():
        raise dataset_error(source, None, "no such file or folder")

    def split(records: list[dict[str, Any]], file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return split_off_validation(records, file, validation_split, seed, batch_size)

    if source.is_file():
        if source.suffix.lower() != ".jsonl":
            raise dataset_error(source, None, "not a .jsonl file (give a .jsonl file or a folder)")
        fmt, records = read_jsonl(source, tokenizer, max_seq_length)
        return Records(*split(records, source), fmt, "jsonl", [str(source)])
    train_file, valid_file = source / "train.jsonl", source / "valid.jsonl"
    if train_file.is_file():
        fmt, train = read_jsonl(train_file, tokenizer, max_seq_length)
        if not valid_file.is_file():
            return Records(*split(train, train_file), fmt, "folder", [str(train_file)])
        _, valid = read_jsonl(valid_file, tokenizer, max_seq_length, expected=(fmt, "train.jsonl"), empty_ok=True)
        require_batches(train, train_file, batch_size, "training", "add records or lower batchSize")
        require_batches(valid, valid_file, batch_size, "validation",
                        "add records to valid.jsonl, lower batchSize, or remove valid.jsonl")
        return Records(train, valid, fmt, "folder", [str(train_file), str(valid_file)])
    if valid_file.is_file():
        raise dataset_error(source, None, "valid.jsonl without train.jsonl", name=source.name)
    files, chunks = read_notes(source, tokenizer, max_seq_length)
    return Records(*split(chunks, source), "text", "notes", [str(f) for f in files])


def read_jsonl(path: Path, tokenizer: Any, limit: int, expected: tuple[str, str] | None = None,
               empty_ok: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """The records of a JSONL file, each checked, and their format (`expected[0]` when given)."""
    records: list[dict[str, Any]] = []
    with open_checked(path) as lines:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError:
                raise dataset_error(path, number, "not UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise dataset_error(path, number, f"not JSON ({exc.msg})") from None
            except RecursionError:
                raise dataset_error(path, number, "not JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise dataset_error(path, number, "not a JSON object")
            fmt = format_of(record)
            if fmt is None:
                raise dataset_error(path, number, 'unknown format: a record needs "text", "messages", '
                                    'or "prompt" and "completion"')
            expected = expected or (fmt, f"line {number}")
            if fmt != expected[0]:
                raise dataset_error(path, number, f"a {fmt} record, but {expected[1]} is {expected[0]}")
            problem = type_problem(record, fmt) or length_problem(record, fmt, tokenizer, limit)
            if problem:
                raise dataset_error(path, number, problem)
            records.append(record)
    if not records and not empty_ok:
        raise dataset_error(path, None, "no records")
    return (expected[0] if expected else "text"), records


def format_of(record: dict[str, Any]) -> str | None:
    """Detected as mlx-lm's create_dataset detects it."""
    if "prompt" in record and "completion" in record:
        return "completions"
    return "chat" if "messages" in record else "text" if "text" in record else None


def type_problem(record: dict[str, Any], fmt: str) -> str | None:
    if fmt == "text":
        return None if is_filled(record["text"]) else '"text" must be a non-empty string'
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return '"tools" must be a list of objects'
    if fmt == "completions":
        if not isinstance(record["prompt"], str):
            return '"prompt" must be a string'
        return None if is_filled(record["completion"]) else '"completion" must be a non-empty string'
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is not an object"
        if message.get("role") not in ROLES:
            return f'messages[{i}]: "role" must be one of {", ".join(ROLES)}'
        calls_tools = message["role"] == "assistant" and message.get("tool_calls") is not None
        if calls_tools and not (isinstance(message["tool_calls"], list) and message["tool_calls"]):
            return f'messages[{i}]: "tool_calls" must be a non-empty list'
        if not isinstance(message.get("content"), str) and not (calls_tools and message.get("content") is None):
            return f'messages[{i}]: "content" must be a string'
    return None


def is_filled(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def length_problem(record: dict[str, Any], fmt: str, tokenizer: Any, limit: int) -> str | None:
    try:
        count = token_count(record, fmt, tokenizer)
    except Exception as exc:  # a chat template may refuse a record (a role it lacks, say): say so now
        return f"cannot be tokenized ({brief(exc)})"
    return f"{count} tokens, more than maxSeqLength {limit}" if count > limit else None


def token_count(record: dict[str, Any], fmt: str, tokenizer: Any) -> int:
    """The record's length as `process` of mlx-lm's TextDataset, ChatDataset or CompletionsDataset makes it."""
    if fmt == "text":
        tokens = list(tokenizer.encode(record["text"]))
        return len(tokens) + (not tokens or tokens[-1] != tokenizer.eos_token_id)  # they append EOS
    messages = record["messages"] if fmt == "chat" else [
        {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return len(tokenizer.apply_chat_template(messages, tools=record.get("tools"), return_dict=False))


def split_off_validation(records: list[dict[str, Any]], file: Path, fraction: float, seed: int,
                         batch_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded choice of round(n * fraction) records, at least a batch, for validation; the rest, in order,
    for training."""
    if fraction == 0:
        require_batches(records, file, batch_size, "training", "add records or lower batchSize")
        return records, []
    size = max(round(len(records) * fraction), batch_size)
    if len(records) - size < batch_size:
        raise dataset_error(file, None, f"{len(records)} records cannot make a validation set of {size} and a "
                            f"training set of batchSize {batch_size}: add records, lower batchSize, "
                            "or set validationSplit 0")
    chosen = set(random.Random(seed).sample(range(len(records)), size))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def require_batches(records: list[dict[str, Any]], file: Path, batch_size: int, role: str, fix: str) -> None:
    if len(records) < batch_size:
        raise dataset_error(file, None, f"{len(records)} {role} records, fewer than batchSize {batch_size}: {fix}")


def read_notes(folder: Path, tokenizer: Any, limit: int) -> tuple[list[Path], list[dict[str, Any]]]:
    files = note_files(folder)
    chunks: list[dict[str, Any]] = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        with open_checked(path, name) as note:
            data = note.read()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise dataset_error(path, data[: exc.start].count(b"\n") + 1, "not UTF-8", name) from None
        title = path.relative_to(folder).with_suffix("").as_posix()
        heading = f"# {title}\n\n"
        chunks += [{"text": heading + chunk} for chunk in note_chunks(text, heading, tokenizer, limit, path, name)]
    if not chunks:
        raise dataset_error(folder, None, "no train.jsonl and no notes (.md, .markdown, .txt)", folder.name)
    return files, chunks


def open_checked(path: Path, name: str | None = None) -> BinaryIO:
    """The file open for reading, unless it is too large or cannot be opened."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise dataset_error(path, None, f"larger than {MAX_FILE_BYTES >> 30} GiB", name)
        return path.open("rb")
    except OSError as exc:
        raise dataset_error(path, None, f"cannot be read ({exc.strerror})", name) from None


def note_files(folder: Path) -> list[Path]:
    root, found = folder.resolve(), []
    for directory, subdirectories, names in os.walk(folder):  # linked folders are listed, not entered
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for name in names:
            path = Path(directory, name)
            if name.startswith(".") or path.suffix.lower() not in NOTE_SUFFIXES or not path.is_file():
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                continue
            found.append(path)
            if len(found) > MAX_NOTES:
                raise dataset_error(folder, None, f"more than {MAX_NOTES} notes", folder.name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def note_chunks(text: str, heading: str, tokenizer: Any, limit: int, path: Path, name: str) -> list[str]:
    def fits(body: str) -> bool:
        return token_count({"text": heading + body}, "text", tokenizer) <= limit

    def too_small() -> InvalidParams:
        return dataset_error(path, None, f"maxSeqLength {limit} leaves no room for text after the heading", name)

    def pack(units: list[str], level: int) -> list[str]:
        pieces: list[str] = []
        current: str | None = None
        start = 0
        while start < len(units):
            count = most_that_fit(current, units[start:], SEPARATORS[level])
            if count:
                head = [] if current is None else [current]
                current, start = SEPARATORS[level].join([*head, *units[start : start + count]]), start + count
            elif current is not None:
                pieces.append(current)
                current = None
            else:  # the unit alone is too long: split it at the next separator
                *done, current = split(units[start], level + 1)
                pieces += done
                start += 1
        return pieces if current is None else [*pieces, current]

    def split(unit: str, level: int) -> list[str]:
        if level < len(SEPARATORS):
            return pack(unit.split(SEPARATORS[level]), level)
        pieces = []
        while not fits(unit):  # a word too long: cut off the longest prefix that fits
            size = most_that_fit(None, list(unit), "")
            if size == 0:
                raise too_small()
            pieces.append(unit[:size])
            unit = unit[size:]
        return [*pieces, unit]

    def most_that_fit(head: str | None, units: list[str], separator: str) -> int:
        """How many of the units, joined to head (which fits), still fit: galloping, then bisection, as adding
        one unit at a time would re-encode the chunk once per unit, a time quadratic in its length."""
        def fit(count: int) -> bool:
            return fits(separator.join([*([] if head is None else [head]), *units[:count]]))

        low, high = 0, 1
        while high <= len(units) and fit(high):
            low, high = high, high * 2
        high = min(high, len(units) + 1)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fit(middle) else (low, middle)
        return low

    lines = "\n".join(line.rstrip() for line in text.splitlines())  # a blank line is now an empty one
    paragraphs = [p.strip("\n") for p in re.split(r"\n\n+", lines) if p.strip()]
    if paragraphs and not fits(""):
        raise too_small()
    return pack(paragraphs, 0)
