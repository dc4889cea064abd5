"""The fine-tuning dataset reader: accepted formats, every rejection with its line, the split, the notes rule.
Lengths are checked against mlx-lm's own dataset classes on the demo model's real tokenizer."""

from __future__ import annotations

import itertools
import json
import os
import types
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.tuner.datasets import create_dataset
from mlx_lm.utils import load_tokenizer

from sidecar.errors import INVALID_PARAMS, InvalidParams
from sidecar.tuning import datasets
from sidecar.tuning.datasets import Records, read_dataset

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}
TOOL_CHAT = {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                              "name": "weather", "arguments": {"city": "Oslo"}}}]},
                          {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}],
             "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
COMPLETION = {"prompt": "Two and two?", "completion": "Four."}
TEXT = {"text": "The cat sat on the mat."}
# A ChatML template that also renders the tools, to show they count toward a record's length.
TOOLS_TEMPLATE = ("{%- if tools %}{{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
                  "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') "
                  "+ '<|im_end|>\\n' }}{%- endfor %}")


@pytest.fixture(scope="module")
def tokenizer(demo_model_path: Path) -> Any:
    return load_tokenizer(demo_model_path)


def mlx_length(record: dict[str, Any], tokenizer: Any) -> int:
    """The record's length as mlx-lm's dataset classes tokenize it."""
    dataset = create_dataset([record], tokenizer, types.SimpleNamespace())
    return len(dataset.process(dataset[0])[0])


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line if isinstance(line, bytes) else
                    (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def read(source: Path, tokenizer: Any, **overrides: Any) -> Records:
    options: dict[str, Any] = {"max_seq_length": 256, "validation_split": 0.0, "seed": 0, "batch_size": 1}
    return read_dataset(source, tokenizer, **{**options, **overrides})


def rejection(source: Path, tokenizer: Any, **overrides: Any) -> InvalidParams:
    with pytest.raises(InvalidParams) as caught:
        read(source, tokenizer, **overrides)
    error = caught.value
    assert error.code == INVALID_PARAMS
    assert error.data["errors"] == [{"path": "/dataset", "message": error.data["reason"]}]
    assert error.message.endswith(error.data["reason"])
    return error


@pytest.mark.parametrize(("record", "fmt"), [(CHAT, "chat"), (TOOL_CHAT, "chat"), (COMPLETION, "completions"),
                                             (TEXT, "text")])
def test_each_format_is_accepted(tmp_path: Path, tokenizer: Any, record: dict[str, Any], fmt: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [record, "", record])
    records = read(path, tokenizer)
    assert records == Records([record, record], [], fmt, "jsonl", [str(path)])


@pytest.mark.parametrize("record", [CHAT, TOOL_CHAT, COMPLETION, {**COMPLETION, "tools": TOOL_CHAT["tools"]}, TEXT])
def test_lengths_are_mlx_lm_s(tokenizer: Any, demo_model_path: Path, record: dict[str, Any]) -> None:
    tools_tokenizer = load_tokenizer(demo_model_path)
    tools_tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    for tok in (tokenizer, tools_tokenizer):
        fmt = datasets.format_of(record)
        assert fmt is not None
        assert datasets.token_count(record, fmt, tok) == mlx_length(record, tok)
    if "tools" in record:  # the template renders them: they count
        assert mlx_length(record, tools_tokenizer) > mlx_length({**record, "tools": None}, tools_tokenizer)


def test_a_record_at_the_limit_passes_and_one_over_it_does_not(tmp_path: Path, tokenizer: Any) -> None:
    length = mlx_length(TEXT, tokenizer)
    path = write_jsonl(tmp_path / "data.jsonl", [TEXT])
    assert read(path, tokenizer, max_seq_length=length).train == [TEXT]
    error = rejection(path, tokenizer, max_seq_length=length - 1)
    assert error.data["line"] == 1
    assert error.data["reason"] == f"{length} tokens, more than maxSeqLength {length - 1}"


LONG_TEXT = {"text": "word " * 400}


@pytest.mark.parametrize(("lines", "line", "reason"), [
    ([TEXT, "", '{"text": "a" "b"}'], 3, "not JSON (Expecting ',' delimiter)"),
    ([TEXT, b"\xff\xfe\n"], 2, "not UTF-8"),
    ([TEXT, "[1, 2]"], 2, "not a JSON object"),
    ([{"title": "x"}], 1, 'unknown format: a record needs "text", "messages", or "prompt" and "completion"'),
    ([CHAT, CHAT, TEXT], 3, "a text record, but line 1 is chat"),
    ([COMPLETION, {"prompt": "x"}], 2, 'unknown format: a record needs "text", "messages", or "prompt" and "completion"'),
    ([TEXT, {"text": ""}], 2, '"text" must be a non-empty string'),
    ([{"text": 5}], 1, '"text" must be a non-empty string'),
    ([{"prompt": 1, "completion": "x"}], 1, '"prompt" must be a string'),
    ([{"prompt": "x", "completion": ""}], 1, '"completion" must be a non-empty string'),
    ([{"messages": []}], 1, '"messages" must be a non-empty list'),
    ([{"messages": ["hi"]}], 1, "messages[0] is not an object"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], 1,
     'messages[0]: "role" must be one of system, user, assistant, tool'),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}], 1,
     'messages[1]: "content" must be a string'),
    ([{"messages": [{"role": "user", "tool_calls": [{}]}]}], 1, 'messages[0]: "content" must be a string'),
    ([{"messages": [{"role": "assistant", "tool_calls": []}]}], 1, 'messages[0]: "tool_calls" must be a non-empty list'),
    ([{**CHAT, "tools": {"name": "f"}}], 1, '"tools" must be a list of objects'),
    ([TEXT, TEXT, LONG_TEXT], 3, "tokens, more than maxSeqLength 256"),
])
def test_a_bad_record_is_rejected_with_its_line(tmp_path: Path, tokenizer: Any, lines: list[Any], line: int,
                                                reason: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    error = rejection(path, tokenizer)
    assert error.data["file"] == str(path)
    assert error.data["line"] == line
    assert reason in error.data["reason"]
    assert error.message.startswith(f"train.jsonl line {line}: ")


def test_a_different_format_later_is_rejected(tmp_path: Path, tokenizer: Any) -> None:
    error = rejection(write_jsonl(tmp_path / "data.jsonl", [COMPLETION, "", TEXT]), tokenizer)
    assert (error.data["line"], error.data["reason"]) == (3, "a text record, but line 1 is completions")


def test_a_template_that_refuses_a_record_is_reported_before_training(tmp_path: Path, demo_model_path: Path) -> None:
    strict = load_tokenizer(demo_model_path)
    strict._tokenizer.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'tool' %}"
                                       "{{ raise_exception('no tool role') }}{%- endif %}{{ m['content'] }}"
                                       "{%- endfor %}")
    error = rejection(write_jsonl(tmp_path / "data.jsonl", [CHAT, TOOL_CHAT]), strict)
    assert error.data["line"] == 2
    assert error.data["reason"].startswith("cannot be tokenized (") and "no tool role" in error.data["reason"]


@pytest.mark.parametrize(("lines", "options", "reason"), [
    (["", "  "], {}, "no records"),
    ([TEXT] * 3, {"batch_size": 4}, "3 training records, fewer than batchSize 4: add records or lower batchSize"),
    ([TEXT] * 7, {"batch_size": 4, "validation_split": 0.1},
     "7 records cannot make a validation set of 4 and a training set of batchSize 4: add records, "
     "lower batchSize, or set validationSplit 0"),
    ([TEXT], {"validation_split": 1.0}, "validationSplit must be at least 0 and below 1, not 1.0"),
])
def test_a_dataset_too_small_is_rejected(tmp_path: Path, tokenizer: Any, lines: list[Any], options: dict[str, Any],
                                         reason: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    error = rejection(path, tokenizer, **options)
    assert (error.data["line"], error.data["reason"]) == (None, reason)


def test_a_missing_or_odd_source_is_rejected(tmp_path: Path, tokenizer: Any) -> None:
    assert rejection(tmp_path / "nowhere.jsonl", tokenizer).data["reason"] == "no such file or folder"
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert "not a .jsonl file" in rejection(tmp_path / "notes.csv", tokenizer).data["reason"]


def test_a_huge_jsonl_file_is_refused_unread(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as sparse:  # a hole, not a gigabyte on disk; reading it would find NULs
        sparse.truncate(datasets.MAX_FILE_BYTES + 1)
    error = rejection(path, tokenizer)
    assert (error.data["line"], error.data["reason"]) == (None, "larger than 1 GiB")


def test_a_split_is_seeded_sized_and_keeps_order(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"text": f"record {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    first = read(path, tokenizer, validation_split=0.2, seed=7, batch_size=2)
    assert first == read(path, tokenizer, validation_split=0.2, seed=7, batch_size=2)
    assert len(first.valid) == 8 and len(first.train) == 32
    assert sorted(first.train + first.valid, key=records.index) == records
    assert first.train == [r for r in records if r in first.train]  # order preserved
    assert first.valid == [r for r in records if r in first.valid]
    others = {tuple(r["text"] for r in read(path, tokenizer, validation_split=0.2, seed=seed).valid)
              for seed in range(8)}
    assert len(others) > 1  # the seed decides
    # At least a batch is split off, however small the fraction.
    assert len(read(path, tokenizer, validation_split=0.01, batch_size=5).valid) == 5


def test_a_folder_with_train_only_is_split(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "data" / "train.jsonl", [CHAT] * 10)
    write_jsonl(tmp_path / "data" / "test.jsonl", ["not json at all"])  # never read
    records = read(tmp_path / "data", tokenizer, validation_split=0.3)
    assert (len(records.train), len(records.valid), records.format, records.source) == (7, 3, "chat", "folder")
    assert records.files == [str(train)]


def test_a_folder_with_valid_uses_it_as_is(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "data" / "train.jsonl", [COMPLETION] * 4)
    valid_record = {"prompt": "One and one?", "completion": "Two."}
    valid = write_jsonl(tmp_path / "data" / "valid.jsonl", [valid_record, valid_record])
    records = read(tmp_path / "data", tokenizer, validation_split=0.5, batch_size=2)
    assert records == Records([COMPLETION] * 4, [valid_record] * 2, "completions", "folder", [str(train), str(valid)])

    error = rejection(tmp_path / "data", tokenizer, batch_size=3)
    assert error.data["file"] == str(valid)
    assert error.data["reason"] == ("2 validation records, fewer than batchSize 3: add records to valid.jsonl, "
                                    "lower batchSize, or remove valid.jsonl")
    write_jsonl(valid, [valid_record, TEXT])
    error = rejection(tmp_path / "data", tokenizer)
    assert error.message == "valid.jsonl line 2: a text record, but train.jsonl is completions"
    train.unlink()
    assert rejection(tmp_path / "data", tokenizer).data["reason"] == "valid.jsonl without train.jsonl"


# ---------------------------------------------------------------- notes


def paragraph(i: int, words: int = 12) -> str:
    return " ".join(f"p{i}w{j}" for j in range(words)) + "."


def body_of(chunk: dict[str, Any], title: str) -> str:
    heading = f"# {title}\n\n"
    assert chunk["text"].startswith(heading)
    return str(chunk["text"][len(heading):])


def test_notes_are_packed_greedily_under_the_limit(tmp_path: Path, tokenizer: Any) -> None:
    paragraphs = [paragraph(i) for i in range(30)]
    (tmp_path / "notes" / "topics").mkdir(parents=True)
    (tmp_path / "notes" / "topics" / "cats.md").write_text("\n\n \n".join(paragraphs) + "\n")
    records = read(tmp_path / "notes", tokenizer, max_seq_length=120)
    assert (records.format, records.source) == ("text", "notes")
    assert records.files == [str(tmp_path / "notes" / "topics" / "cats.md")]
    bodies = [body_of(chunk, "topics/cats") for chunk in records.train]
    assert 2 < len(bodies) < 30
    assert "\n\n".join(bodies) == "\n\n".join(paragraphs)  # whole paragraphs, in order
    for chunk in records.train:
        assert mlx_length(chunk, tokenizer) <= 120
    for this, following in itertools.pairwise(bodies):  # greedy: the next paragraph did not fit
        longer = {"text": "# topics/cats\n\n" + this + "\n\n" + following.split("\n\n")[0]}
        assert mlx_length(longer, tokenizer) > 120
    assert read(tmp_path / "notes", tokenizer, max_seq_length=120) == records


def test_a_long_paragraph_is_split_at_lines_then_words_then_within_a_word(tmp_path: Path, tokenizer: Any) -> None:
    lines = [paragraph(i, 6) for i in range(20)]
    long_line = paragraph(99, 80)
    long_word = "x" * 400
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("short one\n\n" + "\n".join(lines) + "\n\n" + long_line + "\n\n"
                                              + long_word)
    chunks = read(tmp_path / "notes", tokenizer, max_seq_length=60).train
    bodies = [body_of(chunk, "n") for chunk in chunks]
    for chunk in chunks:
        assert mlx_length(chunk, tokenizer) <= 60
    line_chunks = [b for b in bodies if "p0w0" in b or any(line in b.split("\n") for line in lines[1:])]
    assert "\n".join(line_chunks).replace("short one\n\n", "").split("\n") == lines  # cut at line ends
    word_chunks = [b for b in bodies if "p99w" in b]
    assert len(word_chunks) > 1 and " ".join(word_chunks).startswith(long_line)  # cut at spaces
    word_pieces = [b for b in bodies if set(b) == {"x"}]
    assert len(word_pieces) > 1 and "".join(word_pieces) == long_word


def test_which_notes_are_read_and_in_what_order(tmp_path: Path, tokenizer: Any) -> None:
    notes = tmp_path / "notes"
    for name, text in {"b.md": "bee", "a/z.markdown": "zed", "a/y.txt": "why", "c.MD": "sea",
                       ".hidden.md": "no", ".git/x.md": "no", "d/.x.md": "no", "e.py": "no", "empty.md": " \n\n",
                       }.items():
        (notes / name).parent.mkdir(parents=True, exist_ok=True)
        (notes / name).write_text(text)
    (tmp_path / "outside.md").write_text("no")
    os.symlink(tmp_path / "outside.md", notes / "link-out.md")
    os.symlink(notes / "b.md", notes / "link-in.md")
    records = read(notes, tokenizer)
    assert [r["text"] for r in records.train] == [
        "# a/y\n\nwhy", "# a/z\n\nzed", "# b\n\nbee", "# c\n\nsea", "# link-in\n\nbee"]
    assert records.files == [str(notes / n) for n in ("a/y.txt", "a/z.markdown", "b.md", "c.MD", "empty.md",
                                                       "link-in.md")]


def test_bad_notes_folders_are_rejected(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    assert rejection(notes, tokenizer).data["reason"] == "no train.jsonl and no notes (.md, .markdown, .txt)"
    (notes / "empty.md").write_text("\n")
    assert rejection(notes, tokenizer).data["reason"] == "no train.jsonl and no notes (.md, .markdown, .txt)"
    (notes / "sub").mkdir()
    (notes / "sub" / "bad.md").write_bytes(b"fine\n\nfine\n\xc3(\n")
    error = rejection(notes, tokenizer)
    assert error.message == "sub/bad.md line 4: not UTF-8"
    assert error.data["file"] == str(notes / "sub" / "bad.md")
    (notes / "sub" / "bad.md").write_text("fine")
    assert "leaves no room" in rejection(notes, tokenizer, max_seq_length=5).data["reason"]
    monkeypatch.setattr(datasets, "MAX_NOTES", 1)
    assert rejection(notes, tokenizer).data["reason"] == "more than 1 notes"
