"""Settings survive every process boundary: LOCALMLX_* environment -> Settings -> command-line
flags -> the environment of a spawned child -> Settings, unchanged, for every setting."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import build_parser
from sidecar.demo_model import DEMO_MODEL_DIRNAME
from sidecar.settings import (
    Settings,
    env_from_args,
    env_from_settings,
    flag,
    parse_duration,
    settings_from_args,
    settings_from_env,
)

# A value for every setting, none of them the default, each one hard for its text form: the
# other list separator inside a path, commas inside a name list's neighbours, a duration with
# an exponent in its float form, bytes past 2**53, -1 and 0 where they mean something.
SAMPLES: dict[str, Any] = {
    "models_dir": Path("/srv/models, with a comma"),
    "default_model": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    "preload_models": ("demo", "mlx-community/a:b", "/abs/path:with-colon"),
    "draft_models": (("mlx-community/Qwen3-8B-4bit", "mlx-community/Qwen3-0.6B-4bit"), ("/m/a:b", "demo")),
    "max_tokens": 123_457,
    "temperature": 0.1 + 0.2,  # 0.30000000000000004: no digit may be lost
    "jit_load": False,
    "auto_download": True,
    "enable_cache": False,
    "response_cache_entries": 0,
    "response_cache_bytes": (1 << 53) + 1,
    "prefix_cache": False,
    "prompt_cache_size": 3,
    "prompt_cache_bytes": 3 << 40,
    "batching": False,
    "max_batch_size": 1,
    "prefill_step_size": 7,
    "stream_buffer_bytes": 65_537,
    "max_line_bytes": 999,
    "max_pending_requests": 5,
    "max_pending_bytes": 12_345,
    "max_queue": 0,
    "max_loaded_models": 9,
    "allowed_orgs": ("*", "me", "them"),
    "quantization": "4bit",
    "keep_originals": True,
    "memory_budget": 1536 << 20,
    "offload_inactive": 1e-05,
    "allowed_roots": (Path("/a"), Path("/b,c"), Path("/d e")),
    "allow_image_urls": True,
    "max_image_bytes": 3 << 20,
    "max_image_pixels": 123_456,
    "profiles_dir": Path("/Users/me/localmlx profiles, with a comma"),
    "hostfile": Path("/etc/localmlx/hosts, with a comma.json"),
    "distributed_mode": "pipeline",
    "distributed_backend": "jaccl",
    "distributed_launcher": "ssh -p 2222 {ssh} -- 'quoted' \"twice\"",
    "distributed_port": 40000,
    "distributed_timeout": 2.5,
    "distributed_allow_public": True,
    "blas": "/opt/blas, custom/libopenblas.so",
    "inject_faults": ("generation", "method:models/list"),
    "log_level": "DEBUG",
    "log_format": "json",
}
NAMES = [f.name for f in dataclasses.fields(Settings)]
EXPECTED = Settings(**SAMPLES)


def test_every_setting_has_a_sample_other_than_its_default() -> None:
    assert sorted(SAMPLES) == sorted(NAMES), "a new setting needs a sample here"
    defaults = Settings()
    assert [name for name in NAMES if getattr(defaults, name) == SAMPLES[name]] == []


@pytest.mark.parametrize("name", NAMES)
def test_each_value_reads_back_from_its_text(name: str) -> None:
    codec = dataclasses.fields(Settings)[NAMES.index(name)].metadata["setting"].codec
    text = codec.format(SAMPLES[name])
    assert codec.parse(text) == SAMPLES[name], text
    default = getattr(Settings(), name)
    assert codec.parse(codec.format(default)) == default


def test_environment_to_settings_and_back() -> None:
    env = env_from_settings(EXPECTED)
    assert set(env) == {f.metadata["setting"].env for f in dataclasses.fields(Settings)}
    assert settings_from_env(env) == EXPECTED
    assert env["LOCALMLX_ALLOWED_ROOTS"] == os.pathsep.join(["/a", "/b,c", "/d e"])
    assert settings_from_env(env_from_settings(Settings())) == Settings()


def _flags(settings: Settings) -> list[str]:
    return [f"{flag(name)}={text}" for name, text in zip(NAMES, env_from_settings(settings).values(), strict=True)]


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["repl"], ["demo-model"], ["models", "list"]])
def test_flags_reach_a_spawned_sidecar_unchanged(command: list[str]) -> None:
    """Each CLI command that spawns a sidecar hands its flags on as the child's environment."""
    where = 1 if command[0] == "models" else len(command)  # `models` takes the flags before its action
    args = build_parser().parse_args([*command[:where], *_flags(EXPECTED), *command[where:]])
    assert settings_from_args(args, environ={}) == EXPECTED
    assert settings_from_env(env_from_args(args)) == EXPECTED


def test_flags_given_override_the_environment_and_the_rest_pass_nothing() -> None:
    args = build_parser().parse_args(["repl", "--allowed-roots", os.pathsep.join(["/x", "/y,z"]),
                                      "--offload-inactive", "-1", "--memory-budget", "1.5G"])
    env = env_from_args(args)
    assert env == {"LOCALMLX_ALLOWED_ROOTS": os.pathsep.join(["/x", "/y,z"]), "LOCALMLX_OFFLOAD_INACTIVE": "-1",
                   "LOCALMLX_MEMORY_BUDGET": str(3 << 29)}
    settings = settings_from_args(args, environ={"LOCALMLX_ALLOWED_ROOTS": "/elsewhere", "LOCALMLX_MAX_QUEUE": "4"})
    assert settings.allowed_roots == (Path("/x"), Path("/y,z")) and settings.max_queue == 4


def test_texts_people_write() -> None:
    read = settings_from_env({"LOCALMLX_MEMORY_BUDGET": "2.5g",
                              "LOCALMLX_OFFLOAD_INACTIVE": "1h30m", "LOCALMLX_JIT_LOAD": "off",
                              "LOCALMLX_BATCHING": "Yes", "LOCALMLX_PRELOAD_MODELS": " demo , other ,",
                              "LOCALMLX_ALLOWED_ROOTS": f"~/models{os.pathsep}{os.pathsep}/srv",
                              "LOCALMLX_QUANTIZATION": "8", "LOCALMLX_BLAS": " Bundled "})
    assert (read.memory_budget, read.offload_inactive) == (5 << 29, 5400.0)
    assert [settings_from_env({"LOCALMLX_MEMORY_BUDGET": text}).memory_budget for text in ("512KiB", "3M", "7")] \
        == [512 << 10, 3 << 20, 7]
    assert (read.jit_load, read.batching, read.quantization, read.blas) == (False, True, "8bit", "bundled")
    assert read.preload_models == ("demo", "other")
    assert read.allowed_roots == (Path("~/models").expanduser(), Path("/srv"))
    assert parse_duration("250ms") == 0.25 and parse_duration(-1) == -1


@pytest.mark.parametrize("env, value", [("LOCALMLX_MEMORY_BUDGET", "-1G"), ("LOCALMLX_MEMORY_BUDGET", "inf"),
                                        ("LOCALMLX_OFFLOAD_INACTIVE", "-2"), ("LOCALMLX_JIT_LOAD", "maybe"),
                                        ("LOCALMLX_MAX_BATCH_SIZE", "0"), ("LOCALMLX_BLAS", "relative/lib.so")])
def test_a_bad_value_stops_start_up_naming_its_variable(env: str, value: str) -> None:
    with pytest.raises(SystemExit, match=env):
        settings_from_env({env: value})


def test_a_list_refuses_an_item_its_text_could_not_give_back() -> None:
    def codec(name: str) -> Any:
        return dataclasses.fields(Settings)[NAMES.index(name)].metadata["setting"].codec

    with pytest.raises(ValueError):
        codec("allowed_roots").format((Path(f"/a{os.pathsep}b"),))
    for names in (("a,b",), (" a",), ("",)):
        with pytest.raises(ValueError):
            codec("allowed_orgs").format(names)


def test_allowed_roots_given_as_a_flag_reach_the_sidecar_the_cli_spawns(sidecar_env, models_dir: Path,
                                                                        tmp_path: Path) -> None:
    """`localmlx models --allowed-roots A:B status PATH` for a model under each root: the
    spawned sidecar must see both roots (a root whose name has a comma included)."""
    first = tmp_path / "one,two"
    shutil.copytree(models_dir / DEMO_MODEL_DIRNAME, first / "copy")
    env = {**os.environ, **sidecar_env, "LOCALMLX_MODELS_DIR": str(tmp_path / "empty")}
    roots = os.pathsep.join([str(first), str(models_dir)])
    for model in (first / "copy", models_dir / DEMO_MODEL_DIRNAME):
        done = subprocess.run([sys.executable, "-m", "sidecar", "models", "--allowed-roots", roots, "status", "--json",
                               str(model)], capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["source"] == "local-path"
