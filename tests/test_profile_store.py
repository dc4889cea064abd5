"""The profile store: TOML files in, checked Profiles out, and back; every malformed file gets an
error naming the file and what is wrong, and never stops the others from loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import Forbidden, InvalidParams
from sidecar.profiles.store import MAX_FILE_BYTES, Profile, ProfileStore, profile_from_wire

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\r\n{% endfor %}<|assistant|>\n"
FULL = {
    "model": "mlx-community/Qwen3-4B-4bit", "adapter": "my-notes", "template": TEMPLATE,
    "system": "You are concise.\nVery.", "contextLength": 8192, "keepAlive": "10m",
    "draftModel": "mlx-community/Qwen3-0.6B-4bit", "tasks": ["chat", "summarize"],
    "defaults": {"temperature": 0.2, "maxTokens": 512, "stop": ["\n\n", "\r\n"], "thinking": False,
                 "thinkingBudget": 64, "topP": 0.9, "topK": 40, "minP": 0.05, "repetitionPenalty": 1.1,
                 "presencePenalty": 0.5, "frequencyPenalty": -0.5, "seed": 7,
                 "responseFormat": {"type": "json_schema", "schema": {"type": "object"}}},
}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(folder: Path, text: str, name: str = "p") -> InvalidParams:
    path = write(folder, name, text)
    with pytest.raises(InvalidParams) as caught:
        ProfileStore([folder], folder).get(name)
    assert str(path) in caught.value.message and caught.value.data["path"] == str(path)
    assert caught.value.data["profile"] == name
    return caught.value


def test_round_trip_save_get_to_wire(tmp_path: Path) -> None:
    store = ProfileStore([tmp_path], tmp_path)
    saved = store.save("fast", FULL)
    got = store.get("fast")
    assert got == saved
    wire = got.to_wire()
    assert {k: v for k, v in wire.items() if k not in ("name", "path", "templateSource")} == FULL
    assert (wire["name"], wire["path"], wire["templateSource"]) == ("fast", str(tmp_path / "fast.toml"), "inline")
    assert store.save("fast", {"model": "demo"}).to_wire() == {  # overwritten whole: unset is null
        "name": "fast", "model": "demo", "adapter": None, "template": None, "templateSource": None, "system": None,
        "defaults": {}, "contextLength": None, "keepAlive": None, "draftModel": None, "tasks": [],
        "path": str(tmp_path / "fast.toml")}
    assert store.names() == ["fast"] and [p.name for p in store.list()[0]] == ["fast"]


def test_saved_file_is_human_readable(tmp_path: Path) -> None:
    ProfileStore([tmp_path], tmp_path).save("doc", {"model": "demo", "template": "{{ a }}\n{{ b }}\n",
                                                    "defaults": {"maxTokens": 512.0}})
    text = (tmp_path / "doc.toml").read_text()
    assert 'model = "demo"' in text and "[defaults]\nmax_tokens = 512\n" in text  # integral float -> int
    assert '"""\n{{ a }}\n{{ b }}\n"""' in text  # a multi-line template stays multi-line


def test_file_layout_as_documented(tmp_path: Path) -> None:
    write(tmp_path, "p", """
        model = "mlx-community/Qwen3-4B-4bit"
        keep_alive = -1
        tasks = ["code"]
        [defaults]
        temperature = 0
        stop = ["\\n\\n"]
        response_format = { type = "json_object" }
        """)
    profile = ProfileStore([tmp_path], tmp_path).get("p")
    assert isinstance(profile, Profile)
    assert profile.defaults == {"temperature": 0, "stop": ["\n\n"], "responseFormat": {"type": "json_object"}}
    assert (profile.keep_alive, profile.tasks, profile.template) == (-1, ("code",), None)


@pytest.mark.parametrize(("text", "pointer", "words"), [
    ('model = "m"\ncolour = "red"', "/colour", "unknown key"),
    ('model = "m"\n[defaults]\ntemprature = 1', "/defaults/temprature", "unknown"),
    ('adapter = "a"', "/model", "missing"),
    ('model = ""', "/model", "should be non-empty"),
    ("model = 3", "/model", "is not of type 'string'"),
    ('model = "m"\n[defaults]\ntemperature = "hot"', "/defaults/temperature", "not of type 'number'"),
    ('model = "m"\n[defaults]\ntemperature = -1', "/defaults/temperature", "less than the minimum"),
    ('model = "m"\n[defaults]\ntemperature = nan', "/defaults/temperature", "NaN"),
    ('model = "m"\n[defaults]\nmax_tokens = 0', "/defaults/max_tokens", "less than the minimum of 1"),
    ('model = "m"\n[defaults]\nmax_tokens = 1.5', "/defaults/max_tokens", "not of type 'integer'"),
    ('model = "m"\n[defaults]\nstop = "x"', "/defaults/stop", "not of type 'array'"),
    ('model = "m"\n[defaults]\nstop = [1]', "/defaults/stop/0", "not of type 'string'"),
    ('model = "m"\n[defaults]\nstop = [%s]' % ", ".join(['"x"'] * 17), "/defaults/stop", "too long"),
    ('model = "m"\n[defaults]\nthinking = 1', "/defaults/thinking", "not of type 'boolean'"),
    ('model = "m"\n[defaults]\ntop_k = -1', "/defaults/top_k", "less than the minimum"),
    ('model = "m"\n[defaults]\ntop_p = 2', "/defaults/top_p", "greater than the maximum"),
    ('model = "m"\n[defaults]\nresponse_format = "json"', "/defaults/response_format", "is not valid under any"),
    ('model = "m"\ntasks = ["chat", "poetry"]', "/tasks/1", "is not one of"),
    ('model = "m"\ntasks = "chat"', "/tasks", "not of type 'array'"),
    ('model = "m"\ncontext_length = 0', "/context_length", "less than the minimum"),
    ('model = "m"\nkeep_alive = "soon"', "/keep_alive", "is not valid under any"),
    ('model = "m"\nkeep_alive = true', "/keep_alive", "is not valid under any"),
    ('model = "m"\ntemplate = "x"\ntemplate_file = "t.jinja"', "/template_file", "not both"),
    ('model = "m"\ntemplate_file = "absent.jinja"', "/template_file", "no such file"),
    ('model = "m"\n[defaults]\nmax_tokens = 1979-05-27', "/defaults/max_tokens", "not of type 'integer'"),
])
def test_each_problem_is_named(tmp_path: Path, text: str, pointer: str, words: str) -> None:
    errors = refusal(tmp_path, text).data["errors"]
    assert [e["path"] for e in errors] == [pointer], errors
    assert words in errors[0]["message"]


def test_every_problem_at_once(tmp_path: Path) -> None:
    error = refusal(tmp_path, 'colour = 1\n[defaults]\ntop_k = "x"\nfoo = 2')
    assert [e["path"] for e in error.data["errors"]] == ["/colour", "/defaults/foo", "/model", "/defaults/top_k"]
    assert error.message.startswith(f"{tmp_path / 'p.toml'}: /colour: unknown key")


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    error = refusal(tmp_path, 'model = "m"\n\nsystem = = "x"\n')
    assert "TOML syntax" in error.message and "line 3, column 10" in error.message
    assert error.data["errors"][0] | {"message": ""} == {"path": "", "message": "", "line": 3, "column": 10}


def test_jinja_syntax_error_names_template_line(tmp_path: Path) -> None:
    error = refusal(tmp_path, 'model = "m"\ntemplate = """{% for m in messages %}\n{{ m.content }\n{% endfor %}"""')
    assert error.data["errors"][0]["path"] == "/template" and error.data["errors"][0]["line"] == 2
    assert "template line 2: unexpected '}'" in error.message
    (tmp_path / "bad.jinja").write_text("ok\nok\n{% if %}")
    error = refusal(tmp_path, 'model = "m"\ntemplate_file = "bad.jinja"')
    assert error.data["errors"][0]["line"] == 3 and error.data["errors"][0]["path"] == "/template_file"


def test_transformers_template_syntax_parses(tmp_path: Path) -> None:
    text = "{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}" \
           "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert ProfileStore([tmp_path], tmp_path).save("t", {"model": "m", "template": text}).template == text


def test_template_file_relative_to_the_profile_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "templates").mkdir(parents=True)
    (tmp_path / "shared" / "templates" / "chatml.jinja").write_text(TEMPLATE)
    write(tmp_path / "shared", "p", 'model = "m"\ntemplate_file = "templates/chatml.jinja"')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file's folder, not the working directory
    profile = ProfileStore([tmp_path / "shared"], tmp_path).get("p")
    assert profile is not None and profile.template == TEMPLATE
    assert profile.template_source == str(tmp_path / "shared" / "templates" / "chatml.jinja")


def test_oversized_files_are_refused_unread(tmp_path: Path) -> None:
    error = refusal(tmp_path, 'model = "m"\nsystem = "%s"' % ("x" * MAX_FILE_BYTES))
    assert "larger than 1048576 bytes" in error.message
    (tmp_path / "big.jinja").write_text("x" * (MAX_FILE_BYTES + 1))
    error = refusal(tmp_path, 'model = "m"\ntemplate_file = "big.jinja"')
    assert error.data["errors"][0]["path"] == "/template_file" and "larger than" in error.message


def test_symlink_out_of_its_directory_is_not_followed(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", "secret", 'model = "m"')
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.toml").symlink_to(outside)
    (tmp_path / "profiles" / "q.toml").symlink_to(write(tmp_path / "profiles" / "sub", "real", 'model = "m"'))
    store = ProfileStore([tmp_path / "profiles"], tmp_path / "profiles")
    with pytest.raises(InvalidParams, match="symlink out of its directory"):
        store.get("p")
    assert store.get("q") is not None  # a link within the folder is followed


def test_list_reports_malformed_files_and_keeps_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "good", 'model = "m"')
    write(tmp_path, "broken", "model = ")
    write(tmp_path, "wrong", "model = 1")
    write(tmp_path, "auto", 'model = "m"')
    write(tmp_path, "has space", 'model = "m"')
    write(tmp_path, ".hidden", "junk")  # dot files: editors' and our own partial writes
    (tmp_path / "notes.txt").write_text("junk")
    store = ProfileStore([tmp_path], tmp_path)
    profiles, errors = store.list()
    assert [p.name for p in profiles] == ["good"]
    assert [(e["name"], e["path"]) for e in errors] == [
        (name, str(tmp_path / f"{name}.toml")) for name in ("auto", "broken", "has space", "wrong")]
    assert all(str(tmp_path) in e["message"] for e in errors)
    assert "reserved for routing" in errors[0]["message"]
    assert store.names() == ["broken", "good", "wrong"]
    assert store.get("auto") is None and store.get("mlx-community/Qwen3-4B-4bit") is None  # not profile names
    assert store.get("absent") is None


def test_first_directory_wins(tmp_path: Path) -> None:
    write(tmp_path / "env", "p", 'model = "from-env"')
    write(tmp_path / "env", "only-env", 'model = "e"')
    write(tmp_path / "models", "p", 'model = "from-models"')
    write(tmp_path / "models", "only-models", 'model = "m"')
    store = ProfileStore([tmp_path / "env", tmp_path / "models", tmp_path / "missing"], tmp_path / "models")
    assert store.names() == ["only-env", "only-models", "p"]
    got = store.get("p")
    assert got is not None and got.model == "from-env" and got.path == tmp_path / "env" / "p.toml"


def test_delete_only_in_write_dir(tmp_path: Path) -> None:
    write(tmp_path / "env", "theirs", 'model = "m"')
    store = ProfileStore([tmp_path / "env", tmp_path / "models"], tmp_path / "models")
    store.save("mine", {"model": "m"})
    with pytest.raises(Forbidden, match="does not write") as caught:
        store.delete("theirs")
    assert caught.value.data == {"profile": "theirs", "path": str(tmp_path / "env" / "theirs.toml")}
    assert store.delete("mine") is True and store.delete("mine") is False and store.delete("../env/theirs") is False
    assert store.names() == ["theirs"]


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ProfileStore([tmp_path / "w"], tmp_path / "w")
    store.save("p", {"model": "one"})
    store.save("p", {"model": "two"})
    assert os.listdir(tmp_path / "w") == ["p.toml"]
    assert (tmp_path / "w" / "p.toml").stat().st_mode & 0o777 == 0o644
    with pytest.raises(InvalidParams, match="exists"):
        store.save("p", {"model": "three"}, overwrite=False)
    with pytest.raises(InvalidParams):  # a bad profile is refused before any file is written
        store.save("q", {"model": "m", "tasks": ["dance"]})
    assert os.listdir(tmp_path / "w") == ["p.toml"]
    profile = store.get("p")
    assert profile is not None and profile.model == "two"


def test_save_refuses_a_name_taken_elsewhere_without_overwrite(tmp_path: Path) -> None:
    write(tmp_path / "env", "p", 'model = "m"')
    store = ProfileStore([tmp_path / "env", tmp_path / "w"], tmp_path / "w")
    with pytest.raises(InvalidParams, match="exists"):
        store.save("p", {"model": "n"}, overwrite=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("name", "fields", "pointer"), [
    ("auto", {"model": "m"}, ""),
    ("a/b", {"model": "m"}, ""),
    ("p", {"model": "m", "templateFile": "x"}, "/templateFile"),
    ("p", {"model": "m", "defaults": {"max_tokens": 5}}, "/defaults/max_tokens"),
    ("p", {"model": "m", "defaults": {"maxTokens": 0}}, "/defaults/maxTokens"),
    ("p", {"model": "m", "contextLength": "big"}, "/contextLength"),
    ("p", {"model": "m", "template": "{% if %}"}, "/template"),
])
def test_wire_errors_name_wire_fields(name: str, fields: dict[str, Any], pointer: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        profile_from_wire(name, fields)
    assert [e["path"] for e in caught.value.data["errors"]] == [pointer]
    assert caught.value.message.startswith(f"profile {name!r}: ")


def test_wire_to_document(tmp_path: Path) -> None:
    assert profile_from_wire("p", {"model": "m", "adapter": None, "defaults": {"topK": 3.0, "seed": None},
                                   "keepAlive": 30}) == {"model": "m", "keep_alive": 30, "defaults": {"top_k": 3}}
