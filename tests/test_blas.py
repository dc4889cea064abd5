"""LOCALMLX_BLAS: the optimized BLAS changes speed, never tokens, and is reported honestly."""

from __future__ import annotations

import _ctypes
import os
import subprocess
import sys
import sysconfig
import time

import pytest
from jsonschema import Draft202012Validator

from sidecar.blas import find_openblas, openblas_candidates
from sidecar.client import SidecarClient, sidecar_command
from sidecar.schema import protocol_schema
from sidecar.settings import settings_from_env

from .conftest import Sidecars, chat_params

OPENBLAS_INSTALLED = sys.platform == "linux" and any(os.path.exists(p) for p in openblas_candidates())
PROMPTS = ["Tell me about the sea.", "What do the mountains say in the morning?"]


def greedy_texts(client: SidecarClient) -> list[str]:
    return [client.request("chat", chat_params(prompt, maxTokens=64))["text"] for prompt in PROMPTS]


def blas_reported(client: SidecarClient, served: dict) -> dict:
    """What initialize said, checked against server/status and the schema."""
    status_blas = client.request("server/status")["blas"]
    assert status_blas == served["serverInfo"]["blas"]
    Draft202012Validator(dict(protocol_schema(), **{"$ref": "#/$defs/BlasInUse"})).validate(status_blas)
    return status_blas


def wait_for_log(client: SidecarClient, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in client.stderr_lines if needle in line]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no stderr line with {needle!r}: {client.stderr_lines[-5:]}")


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice only exists on Linux")
def test_greedy_output_is_identical_with_the_optimized_and_the_bundled_blas(sidecars: Sidecars) -> None:
    optimized = sidecars.spawn(initialize=False, LOCALMLX_BLAS="auto")
    bundled = sidecars.spawn(initialize=False, LOCALMLX_BLAS="bundled")
    optimized_info, bundled_info = optimized.initialize(name="pytest"), bundled.initialize(name="pytest")

    assert blas_reported(bundled, bundled_info) == {"name": "bundled"}
    if OPENBLAS_INSTALLED:
        blas = blas_reported(optimized, optimized_info)
        assert blas["name"] == "openblas" and os.path.exists(blas["library"])
    texts = greedy_texts(optimized)
    assert all(texts)
    assert texts == greedy_texts(bundled)


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice only exists on Linux")
def test_a_library_that_cannot_be_loaded_falls_back_to_bundled_and_says_why(sidecars: Sidecars) -> None:
    client = sidecars.spawn(initialize=False, LOCALMLX_BLAS="/nonexistent/libopenblas.so.0")
    assert blas_reported(client, client.initialize(name="pytest")) == {"name": "bundled"}
    assert "cannot open shared object file" in wait_for_log(client, "LOCALMLX_BLAS=/nonexistent/libopenblas.so.0")
    assert client.request("tokenize", {"text": "still serving"})["tokens"]


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS choice only exists on Linux")
def test_a_library_without_blas_symbols_falls_back_to_bundled(sidecars: Sidecars) -> None:
    not_a_blas = _ctypes.__file__  # a shared library that surely exists and loads
    client = sidecars.spawn(initialize=False, LOCALMLX_BLAS=not_a_blas)
    assert blas_reported(client, client.initialize(name="pytest")) == {"name": "bundled"}
    assert "does not export cblas_sgemm" in wait_for_log(client, f"LOCALMLX_BLAS={not_a_blas}")


def test_a_choice_that_is_neither_a_mode_nor_an_absolute_path_is_rejected_at_start(
        sidecar_env: dict[str, str]) -> None:
    done = subprocess.run(sidecar_command(), input=b"", capture_output=True, timeout=60,
                          env={**os.environ, **sidecar_env, "LOCALMLX_BLAS": "libopenblas.so.0"})
    assert done.returncode != 0 and done.stdout == b""
    assert b"bad LOCALMLX_BLAS='libopenblas.so.0'" in done.stderr


def test_the_setting_accepts_modes_and_absolute_paths() -> None:
    assert settings_from_env({}).blas == "auto"
    assert settings_from_env({"LOCALMLX_BLAS": " Bundled "}).blas == "bundled"
    assert settings_from_env({"LOCALMLX_BLAS": ""}).blas == "auto"
    assert settings_from_env({"LOCALMLX_BLAS": "/opt/blas/libblis.so.4"}).blas == "/opt/blas/libblis.so.4"


def test_the_finder_prefers_the_pthread_build() -> None:
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    pthread_build = f"/usr/lib/{multiarch}/openblas-pthread/libopenblas.so.0"
    alternatives_link = f"/usr/lib/{multiarch}/libopenblas.so.0"
    assert find_openblas({alternatives_link, pthread_build}.__contains__) == pthread_build
    fedora = {"/usr/lib64/libopenblas.so.0", "/usr/lib64/libopenblasp.so.0"}
    assert find_openblas(fedora.__contains__) == "/usr/lib64/libopenblasp.so.0"


def test_without_a_library_on_disk_the_finder_leaves_the_search_to_the_dynamic_linker() -> None:
    assert find_openblas(lambda path: False) == "libopenblas.so.0"
