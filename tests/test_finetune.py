"""models/finetune: training in a worker process with mlx-lm's tuner while the sidecar serves;
progress, cancel, resume, a killed trainer, bad data and the memory budget."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient

from .conftest import Sidecars, chat_params
from .tuning_models import FACT, FACT_PROMPT, build_learner, write_fact_dataset

TEACH = {"iterations": 120, "learningRate": 5e-4, "rank": 32, "numLayers": -1, "batchSize": 4, "stepsPerEval": 20}


@pytest.fixture(scope="module")
def learner(models_dir: Path) -> str:
    return build_learner(models_dir).name


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fact_dataset(tmp_path_factory.mktemp("facts"))


@pytest.fixture
def client(sidecars: Sidecars, facts: Path) -> SidecarClient:
    return sidecars.spawn(LOCALMLX_ALLOWED_ROOTS=str(facts.parent))


class Progress:
    """The $/progress of one token, with an event for 'a training report at or past n'."""

    def __init__(self, client: SidecarClient, token: str) -> None:
        self.token, self.reports = token, []
        self._changed = threading.Condition()
        client.on_notification = self._on_notification

    def _on_notification(self, message: dict[str, Any]) -> None:
        params = message.get("params") or {}
        if message.get("method") == "$/progress" and params.get("token") == self.token:
            with self._changed:
                self.reports.append(params)
                self._changed.notify_all()

    def wait_for_iteration(self, n: int, timeout: float = 120.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            return next((r for r in self.reports if r["phase"] == "train" and r["completed"] >= n), None)

        with self._changed:
            assert self._changed.wait_for(reached, timeout), f"no training report at iteration {n}"
            report = reached()
        assert report is not None
        return report


def finetune(client: SidecarClient, **params: Any) -> Any:
    return client.start_request("models/finetune", {"_meta": {"progressToken": "ft"}, **params})


def adapters(models_dir: Path) -> set[str]:
    root = models_dir / "adapters"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def greedy(client: SidecarClient, model: str) -> str:
    return str(client.request("generate", {"model": model, "prompt": FACT_PROMPT, "maxTokens": 8,
                                           "temperature": 0, "cache": False})["text"])


def test_training_lowers_validation_loss_and_teaches_the_fact(
        client: SidecarClient, learner: str, facts: Path, models_dir: Path) -> None:
    progress = Progress(client, "ft")
    result = client.wait_response(finetune(client, model=learner, dataset=str(facts), name="vault", **TEACH))["result"]
    training = result["training"]
    first_val = next(r["valLoss"] for r in progress.reports if "valLoss" in r)
    assert training["valLoss"] < first_val - 2.0, (first_val, training["valLoss"])
    assert (result["model"], result["base"], result["adapter"]) == (f"{learner}+vault", learner, "vault")
    assert (training["iterations"], training["trainExamples"], training["validExamples"]) == (120, 24, 4)
    assert result["peakMemoryBytes"] > 0 and result["tokensPerSecond"] > 0
    iterations = [r["completed"] for r in progress.reports if r["phase"] == "train"]
    assert iterations == sorted(iterations) and iterations[-1] == 120
    assert all(r["total"] == 120 for r in progress.reports if r["phase"] == "train")
    last = [r for r in progress.reports if r["phase"] == "train"][-1]
    assert {"trainLoss", "valLoss", "tokensPerSecond", "peakMemoryBytes"} <= set(last)
    phases = [r["phase"] for r in progress.reports]
    assert phases.index("validate") < phases.index("load") < phases.index("train") and phases[-1] == "save"
    # The base model does not know the fact; base+adapter, loaded at once, does.
    assert FACT.strip() not in greedy(client, learner)
    assert greedy(client, result["model"]).lstrip().startswith(FACT.strip())
    listed = {a["name"]: a for a in client.request("models/list")["adapters"]}["vault"]
    assert listed["base"] == learner and listed["training"] == training and listed["rank"] == 32
    assert not (models_dir / "adapters" / ".runs" / "vault").exists()


def test_the_same_data_and_seed_give_the_same_adapter(
        client: SidecarClient, learner: str, facts: Path, models_dir: Path) -> None:
    import mlx.core as mx

    runs = []
    for name in ("twin-a", "twin-b"):
        client.request("models/finetune", {"model": learner, "dataset": str(facts), "name": name, "seed": 7,
                                           "iterations": 15, "learningRate": 1e-3, "numLayers": 2})
        runs.append(mx.load(str(models_dir / "adapters" / name / "adapters.safetensors")))
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(mx.array_equal(runs[0][k], runs[1][k]).item() for k in runs[0])  # bit for bit


def test_the_sidecar_serves_while_training_and_a_cancel_leaves_nothing(
        client: SidecarClient, learner: str, facts: Path, models_dir: Path) -> None:
    before = adapters(models_dir)
    progress = Progress(client, "ft")
    run = finetune(client, model=learner, dataset=str(facts), name="busy", iterations=100000, learningRate=1e-4,
                   saveEvery=5)
    progress.wait_for_iteration(6)
    assert client.request("ping") == {}
    assert client.request("server/status")["models"] is not None
    chat = client.generation("chat", chat_params(maxTokens=8, model="demo"))
    assert chat["usage"]["completionTokens"] > 0
    client.cancel(run)
    error = client.wait_response(run, timeout=30)["error"]
    assert error["code"] == -32800 and error["data"] == {"adapter": "busy", "checkpoint": None}
    assert adapters(models_dir) == before  # no adapter, and no checkpoint kept
    assert client.request("ping") == {}


def test_a_kept_checkpoint_resumes(client: SidecarClient, learner: str, facts: Path, models_dir: Path) -> None:
    progress = Progress(client, "ft")
    run = finetune(client, model=learner, dataset=str(facts), name="resumed", iterations=100000, learningRate=1e-3,
                   saveEvery=10, keepCheckpoint=True)
    progress.wait_for_iteration(12)
    client.cancel(run)
    error = client.wait_response(run, timeout=30)["error"]
    kept = models_dir / "adapters" / ".runs" / "resumed"
    checkpoint = json.loads((kept / "checkpoint.json").read_text())["iteration"]
    assert error["code"] == -32800 and error["data"] == {"adapter": "resumed", "checkpoint": checkpoint}
    assert checkpoint >= 10 and checkpoint % 10 == 0
    assert not list(kept.glob("*.partial*")) and not (models_dir / "adapters" / "resumed").exists()
    result = client.request("models/finetune", {"model": learner, "dataset": str(facts), "name": "resumed",
                                                "iterations": checkpoint + 5, "learningRate": 1e-3, "resume": True})
    assert result["training"]["resumedFrom"] == checkpoint and result["training"]["iterations"] == checkpoint + 5
    assert greedy(client, result["model"])  # it loads and answers
    assert not kept.exists()
    with pytest.raises(RpcCallError) as nothing:
        client.request("models/finetune", {"model": learner, "dataset": str(facts), "name": "resumed",
                                           "resume": True, "overwrite": True})
    assert nothing.value.code == -32602  # no checkpoint left to resume


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_a_killed_trainer_fails_its_request_and_the_sidecar_goes_on(
        client: SidecarClient, learner: str, facts: Path, models_dir: Path) -> None:
    progress = Progress(client, "ft")
    run = finetune(client, model=learner, dataset=str(facts), name="killed", iterations=100000)
    progress.wait_for_iteration(2)
    (worker,) = _children(client.process.pid)
    os.kill(worker, signal.SIGKILL)
    error = client.wait_response(run, timeout=30)["error"]
    assert error["code"] == -32020 and error["data"]["exitCode"] == -signal.SIGKILL
    assert "killed" in error["message"]
    assert client.request("ping") == {}
    assert "killed" not in adapters(models_dir) and not (models_dir / "adapters" / ".runs" / "killed").exists()
    assert client.generation("chat", chat_params(maxTokens=4, model="demo"))["usage"]["completionTokens"] > 0


def test_bad_data_is_refused_with_its_line_before_training(
        client: SidecarClient, learner: str, facts: Path) -> None:
    bad = facts.parent / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n')
    progress = Progress(client, "ft")
    error = client.wait_response(finetune(client, model=learner, dataset=str(bad), batchSize=1))["error"]
    assert error["code"] == -32602 and error["data"]["line"] == 3 and "line 3" in error["message"]
    assert "train" not in {r["phase"] for r in progress.reports}
    with pytest.raises(RpcCallError) as outside:
        client.request("models/finetune", {"model": learner, "dataset": "/etc/passwd"})
    assert outside.value.code == -32018
    with pytest.raises(RpcCallError) as both:
        client.request("models/finetune", {"model": learner, "dataset": str(facts), "iterations": 3, "epochs": 1})
    assert both.value.code == -32602


def test_a_run_over_the_budget_is_refused_before_it_starts(
        sidecars: Sidecars, learner: str, facts: Path, models_dir: Path) -> None:
    client = sidecars.spawn(LOCALMLX_ALLOWED_ROOTS=str(facts.parent), LOCALMLX_MEMORY_BUDGET="64MB")
    with pytest.raises(RpcCallError) as refused:
        client.request("models/finetune", {"model": learner, "dataset": str(facts), "batchSize": 16,
                                           "maxSeqLength": 4096})
    error = refused.value
    assert error.code == -32014 and error.data["requiredBytes"] > error.data["availableBytes"]
    assert error.data["budgetBytes"] == 64 * 1000**2 or error.data["budgetBytes"] == 64 << 20
    assert "over" not in adapters(models_dir)
