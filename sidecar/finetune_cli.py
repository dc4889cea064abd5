"""`localmlx finetune DATA --model M`: train a LoRA or DoRA adapter on local data.

As `localmlx models` does, it spawns a sidecar and calls the protocol method
(`models/finetune`), so the shell, the REPL and Wooster train through the same code. While
the run goes, stderr shows a progress bar (iteration/total, train and validation loss,
tokens/s, ETA) on a terminal, or a line per evaluation elsewhere; then stdout gets a short
summary: the adapter's name and how to serve it (`<base>+<name>`), the losses, the time. With
`--json`, stdout gets the result and stderr nothing but errors.

Ctrl-C cancels the run (`$/cancelRequest`: no adapter is written; with --keep-checkpoint the
last checkpoint stays for --resume) and exits 130; a second Ctrl-C stops waiting. An error
(a bad dataset line, too little memory, ...) is printed on stderr, exit code 1.

The dataset (and a base model given as a path) named on the command line is added to the
spawned sidecar's allowed roots: the person who types the path is the one who may grant it.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path
from typing import Any

from .settings import add_setting_flags, env_from_args

CANCELLED_EXIT = 130
_CANCEL_WAIT_S = 60.0  # the trainer stops within seconds of a cancel; past this, stop waiting
_FOREVER_S = 365 * 24 * 3600.0

# flag dest -> models/finetune param, for the flags that are passed on only when given
_VALUES = {"name": "name", "iterations": "iterations", "epochs": "epochs", "learning_rate": "learningRate",
           "batch_size": "batchSize", "rank": "rank", "layers": "numLayers", "max_seq_length": "maxSeqLength",
           "validation_split": "validationSplit", "seed": "seed", "steps_per_eval": "stepsPerEval",
           "save_every": "saveEvery"}
_SWITCHES = {"keep_checkpoint": "keepCheckpoint", "resume": "resume", "overwrite": "overwrite",
             "mask_prompt": "maskPrompt", "grad_checkpoint": "gradCheckpoint"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATA",
                        help="a JSONL file, a folder with train.jsonl (and valid.jsonl) in mlx-lm's chat, "
                             "completions or text format, or a folder of Markdown/text notes")
    parser.add_argument("--model", "-m", required=True, help="the base model to train an adapter for")
    parser.add_argument("--name", default=None, help="the adapter's name (default: the dataset's name)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=int, default=None, help="training steps (default 100)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training set, instead")
    parser.add_argument("--learning-rate", "--lr", type=float, default=None, help="default 1e-5")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    parser.add_argument("--layers", type=int, default=None,
                        help="how many of the last layers to adapt (default 16; -1: all)")
    parser.add_argument("--dora", action="store_true", help="train a DoRA adapter instead of LoRA")
    parser.add_argument("--max-seq-length", type=int, default=None, help="longer records are refused (default 2048)")
    parser.add_argument("--validation-split", type=float, default=None,
                        help="share held out for validation when there is no valid.jsonl (default 0.1)")
    parser.add_argument("--steps-per-eval", type=int, default=None, help="validate every N iterations (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="default 0: same data and seed, same adapter")
    parser.add_argument("--mask-prompt", action="store_true", help="train on completions / the last reply only")
    parser.add_argument("--grad-checkpoint", action="store_true", help="less memory, a slower run")
    parser.add_argument("--save-every", type=int, default=None, help="a checkpoint every N iterations (default 50)")
    parser.add_argument("--keep-checkpoint", action="store_true",
                        help="when cancelled or failed, keep the last checkpoint for --resume")
    parser.add_argument("--resume", action="store_true", help="go on from the kept checkpoint of the run --name")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter of that name")
    parser.add_argument("--json", action="store_true", help="print the result as JSON; no progress")
    add_setting_flags(parser)


def finetune_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"model": args.model, "dataset": str(Path(args.dataset).expanduser().absolute())}
    params.update({param: getattr(args, dest) for dest, param in _VALUES.items() if getattr(args, dest) is not None})
    params.update({param: True for dest, param in _SWITCHES.items() if getattr(args, dest)})
    if args.dora:
        params["fineTuneType"] = "dora"
    return params


def with_allowed_root(env: dict[str, str], path: str) -> dict[str, str]:
    """`env` whose LOCALMLX_ALLOWED_ROOTS (the flag's, else the environment's) also holds `path`."""
    roots = env.get("LOCALMLX_ALLOWED_ROOTS", os.environ.get("LOCALMLX_ALLOWED_ROOTS", ""))
    return {**env, "LOCALMLX_ALLOWED_ROOTS": os.pathsep.join(r for r in (roots, path) if r)}


def run(args: argparse.Namespace) -> int:
    # On use: every `localmlx` command, `serve` included, imports this module for its flags.
    from rich.console import Console

    from .client import SidecarClient, sidecar_command
    from .protocol_defs import REQUEST_CANCELLED
    from .repl.formatting import error_lines, finetune_summary

    err = Console(stderr=True, highlight=False)
    bar = TrainingBar(err, quiet=args.json)
    params = finetune_params(args)
    env = with_allowed_root(env_from_args(args), params["dataset"])
    if args.model.startswith(("/", "~", ".")):  # a model directory named by its path: granted too
        env = with_allowed_root(env, str(Path(args.model).expanduser().absolute()))
    with SidecarClient(sidecar_command(), env=env, on_notification=bar.update) as client:
        client.initialize(name="localmlx-finetune")
        id_ = client.start_request("models/finetune", {**params, "_meta": {"progressToken": "finetune"}})
        response = _wait(client, id_, bar, err)
    bar.stop()
    if response is None:  # a second Ctrl-C: the sidecar was shut down, which stops the run
        return CANCELLED_EXIT
    if "error" in response:
        error = response["error"]
        if error.get("code") == REQUEST_CANCELLED:
            checkpoint = (error.get("data") or {}).get("checkpoint")
            kept = (f"; the checkpoint at iteration {checkpoint} is kept: --resume goes on from it"
                    if checkpoint is not None else "")
            err.print(f"cancelled: no adapter written{kept}", markup=False)
            return CANCELLED_EXIT
        for line in error_lines(error):
            err.print(line, style="red", markup=False)
        return 1
    result = response["result"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(finetune_summary(result)))
    return 0  # even after a Ctrl-C: the run ended as the cancel came, and its adapter is there


def _wait(client: Any, id_: Any, bar: TrainingBar, err: Any) -> dict[str, Any] | None:
    """The run's response; on Ctrl-C, the cancelled run's; None when a second Ctrl-C stopped
    the wait."""
    try:
        response: dict[str, Any] = client.wait_response(id_, timeout=_FOREVER_S)
        return response
    except KeyboardInterrupt:
        pass
    bar.stop()
    err.print("^C: cancelling the run ($/cancelRequest); ^C again stops waiting", style="cyan", markup=False)
    client.cancel(id_)
    try:
        response = client.wait_response(id_, timeout=_CANCEL_WAIT_S)
        return response
    except (KeyboardInterrupt, TimeoutError):
        return None


PHASE_WORDS = {"resolve": "finding the model", "download": "downloading the model", "validate": "reading the dataset",
               "load": "loading the model", "train": "training", "save": "saving the adapter"}


class TrainingBar:
    """`$/progress` of a run on stderr: a rich bar on a terminal (phase, iteration/total,
    losses, tokens/s, ETA), else a line per phase and per evaluation; nothing when quiet.
    Fed from the client's reader thread; once stopped it stays stopped."""

    def __init__(self, console: Any, quiet: bool = False) -> None:
        self._console = console
        self._quiet = quiet
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None
        self._stopped = False
        self._phase: str | None = None
        self._val_loss: float | None = None
        self._last: dict[str, Any] = {}  # the last report's figures: an evaluation brings only its loss

    def update(self, message: dict[str, Any]) -> None:
        if message.get("method") != "$/progress" or self._quiet:
            return
        params = message.get("params") or {}
        with self._lock:
            if self._stopped:
                return
            if self._console.is_terminal:
                self._draw(params)
            else:
                self._log(params)

    def _draw(self, params: dict[str, Any]) -> None:
        from .repl.formatting import training_progress

        phase = str(params.get("phase", ""))
        iterations = params.get("unit") == "iteration"
        if iterations:
            params = self._last = {**self._last, **params}
        fields = {"description": PHASE_WORDS.get(phase, phase), "detail": training_progress(params),
                  "completed": params.get("completed", 0) if iterations else 0,
                  "total": params.get("total") if iterations else None}
        if self._progress is None:
            self._start(fields)
        else:
            self._progress.update(self._task, **fields)

    def _start(self, fields: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<20}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                                  console=self._console, transient=True)
        self._task = self._progress.add_task(**fields)
        self._progress.start()

    def _log(self, params: dict[str, Any]) -> None:
        from .repl.formatting import training_progress

        phase = str(params.get("phase", ""))
        if params.get("unit") != "iteration":
            if phase != self._phase:
                self._phase = phase
                self._console.print(f"{PHASE_WORDS.get(phase, phase)}…", markup=False)
            return
        evaluated = params.get("valLoss") is not None and params.get("valLoss") != self._val_loss
        if evaluated or params.get("completed") == params.get("total"):
            self._val_loss = params.get("valLoss")
            self._console.print(f"iteration {params.get('completed')}/{params.get('total')}: "
                                f"{training_progress(params)}", markup=False)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()
