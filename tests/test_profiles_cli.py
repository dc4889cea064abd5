"""`localmlx profiles create|list|show|edit|rm`: profiles from a shell, through a real sidecar."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sidecar.protocol_defs import INVALID_PARAMS, MODEL_NOT_FOUND

pytestmark = pytest.mark.timeout(60)  # each runs in 4-15 s (a sidecar spawned per command, ~2 s)

# A stand-in for $EDITOR: writes $NEW_PROFILE_TEXT over the file it is given, as a person would.
FAKE_EDITOR = "import os, sys\nopen(sys.argv[1], 'w').write(os.environ['NEW_PROFILE_TEXT'])\n"


@pytest.fixture
def env(sidecar_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **sidecar_env, "LOCALMLX_PROFILES_DIR": str(tmp_path / "profiles")}


def profiles(env: dict[str, str], *args: str, **more_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "profiles", *args], capture_output=True, text=True,
                          env={**env, **more_env}, timeout=25, stdin=subprocess.DEVNULL)


def test_create_and_show(env: dict[str, str], tmp_path: Path) -> None:
    created = profiles(env, "create", "terse", "--model", "demo", "--system", "Be brief.", "--temperature", "0.2",
                       "--max-tokens", "5", "--stop", "END", "--stop", "STOP", "--no-thinking", "--task", "chat",
                       "--task", "code", "--keep-alive", "10m", "--context-length", "512",
                       "--set", "top_p=0.9", "--set", "seed=7", "--json")
    assert created.returncode == 0, created.stderr
    saved = json.loads(created.stdout)
    assert saved["defaults"] == {"temperature": 0.2, "maxTokens": 5, "stop": ["END", "STOP"], "thinking": False,
                                 "topP": 0.9, "seed": 7}
    assert (saved["system"], saved["tasks"], saved["keepAlive"], saved["contextLength"]) == \
        ("Be brief.", ["chat", "code"], "10m", 512)
    on_disk = tomllib.loads((tmp_path / "profiles" / "terse.toml").read_text())
    assert on_disk["defaults"]["max_tokens"] == 5 and on_disk["keep_alive"] == "10m"

    again = profiles(env, "create", "terse", "--model", "demo")
    assert again.returncode == 1 and f"error {INVALID_PARAMS}" in again.stderr and "overwrite" in again.stderr

    shown = profiles(env, "show", "terse")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# profile terse: {tmp_path / 'profiles' / 'terse.toml'}\n")
    assert tomllib.loads(shown.stdout) == on_disk  # the TOML view reads as the file does


def test_list_then_rm(env: dict[str, str]) -> None:
    made = profiles(env, "create", "terse", "--model", "demo", "--system", "Be brief.", "--temperature", "0.2",
                    "--max-tokens", "5", "--task", "chat", "--task", "code", "--keep-alive", "10m",
                    "--context-length", "512")
    assert made.returncode == 0, made.stderr
    listed = profiles(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^terse\s+demo\s+chat,code\s+temperature=0.2 maxTokens=5\s+system, context 512, keep 10m$",
                     listed.stdout, re.M), listed.stdout
    assert profiles(env, "rm", "terse").stdout == "deleted profile terse\n"
    gone = profiles(env, "show", "terse")
    assert gone.returncode == 1 and f"error {MODEL_NOT_FOUND}: Profile not found: terse" in gone.stderr


def test_edit_reports_a_malformed_file_by_line_and_picks_up_a_good_one(env: dict[str, str], tmp_path: Path) -> None:
    editor = tmp_path / "editor.py"
    editor.write_text(FAKE_EDITOR)
    edit_with = {"EDITOR": f"{shlex.quote(sys.executable)} {shlex.quote(str(editor))}", "VISUAL": ""}
    assert profiles(env, "create", "notes", "--model", "demo").returncode == 0
    path = tmp_path / "profiles" / "notes.toml"

    broken = 'model = "demo"\ntemperature = \n'
    bad = profiles(env, "edit", "notes", NEW_PROFILE_TEXT=broken, **edit_with)
    assert bad.returncode == 1
    assert f"error {INVALID_PARAMS}: {path}" in bad.stderr and "line 2" in bad.stderr
    assert "the edited file is kept" in bad.stderr and path.read_text() == broken

    fixed = profiles(env, "edit", "notes", NEW_PROFILE_TEXT='model = "demo"\ntasks = ["code"]\n[defaults]\n'
                     "temperature = 0.5\n", **edit_with)  # a malformed profile opens too: to be fixed
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout == f"profile notes ({path}): demo · tasks code · temperature=0.5\n"
    shown = json.loads(profiles(env, "show", "notes", "--json").stdout)
    assert shown["defaults"] == {"temperature": 0.5} and shown["tasks"] == ["code"]


def test_a_bad_template_or_key_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}\n{{ m ")
    refused = profiles(env, "create", "jinja", "--model", "demo", "--template-file", str(template))
    assert refused.returncode == 1
    assert f"error {INVALID_PARAMS}" in refused.stderr and "template line 2" in refused.stderr
    assert not (tmp_path / "profiles" / "jinja.toml").exists()

    unknown = profiles(env, "create", "x", "--model", "demo", "--set", "bogus=1")
    assert unknown.returncode == 2 and "a profile has no 'bogus'" in unknown.stderr

    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    made = profiles(env, "create", "plain", "--model", "demo", "--template-file", str(template), "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["template"] == template.read_text()  # its text is saved, as written


def test_list_shows_malformed_files_with_their_error(env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "broken.toml").write_text('model = "demo"\n[defaults]\nmax_tokens = "many"\n')
    (folder / "fine.toml").write_text('model = "demo"\nadapter = "notes"\n')
    listed = profiles(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^fine\s+demo\+notes$", listed.stdout, re.M), listed.stdout
    assert re.search(r"^malformed profile broken: .*broken\.toml: /defaults/max_tokens: 'many' is not of type",
                     listed.stdout, re.M), listed.stdout
    as_json = json.loads(profiles(env, "list", "--json").stdout)
    assert [p["name"] for p in as_json["profiles"]] == ["fine"] and as_json["errors"][0]["name"] == "broken"
