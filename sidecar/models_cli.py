"""`localmlx models list|pull|rm|status|fuse`: the model cache (models and adapters) from a shell.

Each command spawns a sidecar and calls the protocol method (`models/list`,
`models/download`, `models/delete`, `models/status`, `models/fuse`), so the shell and
Wooster go through the same code. An adapter named by its path (fuse) is added to the spawned
sidecar's allowed roots, as `localmlx finetune` does with its dataset. Results go to stdout (a table, or JSON with `--json`); progress bars and
errors go to stderr. Exit code 0 on success, 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .settings import add_setting_flags, env_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="every local model: source, size, type, quantization, context")
    pull = actions.add_parser("pull", parents=[common], help="download a model from the Hub (with a progress bar)")
    pull.add_argument("model", help="a Hub repo id, owner/name")
    pull.add_argument("--revision", default=None, help="a branch, tag or commit")
    remove = actions.add_parser("rm", parents=[common], help="delete a model's files, or an adapter's")
    remove.add_argument("model", nargs="?", help="the model (or give --adapter)")
    remove.add_argument("--adapter", default=None, metavar="NAME", help="delete this adapter instead of a model")
    remove.add_argument("--force", action="store_true", help="unload it first if a sidecar has it loaded")
    status = actions.add_parser("status", parents=[common], help="where one model stands")
    status.add_argument("model")
    fuse = actions.add_parser("fuse", parents=[common],
                              help="write a model with an adapter merged into its weights (it loads like any other)")
    fuse.add_argument("model", help="the base model, or <base>+<adapter> alone")
    fuse.add_argument("adapter", nargs="?", help="an adapter's name, or the path of an adapter directory")
    fuse.add_argument("--name", default=None, help="the fused model's name in the models dir (default <base>-<adapter>)")
    fuse.add_argument("--quantize", type=int, default=None, choices=(2, 3, 4, 5, 6, 8), metavar="BITS",
                      help="quantize the fused model (2, 3, 4, 5, 6 or 8 bits)")
    fuse.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128), help="with --quantize")
    fuse.add_argument("--dequantize", action="store_true", help="full-precision weights from a quantized base")
    fuse.add_argument("--overwrite", action="store_true", help="replace a model of that name")


def run(args: argparse.Namespace) -> int:
    # On use: every `localmlx` command, `serve` included, imports this module for its flags.
    from rich.console import Console

    from .client import RpcCallError, SidecarClient, sidecar_command
    from .finetune_cli import with_allowed_root

    out, err = Console(), Console(stderr=True)
    try:
        method, params = _call(args)
    except ValueError as usage:
        err.print(f"localmlx models {args.action}: {usage}", markup=False)
        return 2
    env = env_from_args(args)
    if method == "models/fuse" and is_path(params["adapter"]):
        env = with_allowed_root(env, params["adapter"])
    bar = _ProgressBar(err)
    with SidecarClient(sidecar_command(), env=env, on_notification=bar.update) as client:
        client.initialize(name="localmlx-models")
        try:
            result = client.request(method, params, timeout=24 * 3600)
        except RpcCallError as error:
            bar.stop()
            err.print(f"[red]error {error.code}:[/red] {error.message}")
            return 1
        finally:
            bar.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _show(out, "rm --adapter" if getattr(args, "adapter", None) and args.action == "rm" else args.action, result)
    return 0


def _call(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.action == "list":
        return "models/list", {}
    if args.action == "pull":
        params: dict[str, Any] = {"model": args.model, "_meta": {"progressToken": "pull"}}
        if args.revision:
            params["revision"] = args.revision
        return "models/download", params
    if args.action == "rm":
        if (args.model is None) == (args.adapter is None):
            raise ValueError("name a model, or an adapter with --adapter")
        target = {"model": args.model} if args.adapter is None else {"adapter": args.adapter}
        return "models/delete", {**target, "force": args.force}
    if args.action == "fuse":
        return "models/fuse", _fuse_params(args)
    return "models/status", {"model": args.model}


def _fuse_params(args: argparse.Namespace) -> dict[str, Any]:
    model, adapter = args.model, args.adapter
    if adapter is None:  # `learner+notes`, as finetune names what it made
        model, plus, adapter = model.rpartition("+")
        if not plus or not model or not adapter:
            raise ValueError("name the base model and the adapter (MODEL ADAPTER, or MODEL+ADAPTER)")
    if args.group_size is not None and args.quantize is None:
        raise ValueError("--group-size goes with --quantize")
    params: dict[str, Any] = {"model": model, "adapter": str(Path(adapter).expanduser().absolute())
                              if is_path(adapter) else adapter, "_meta": {"progressToken": "fuse"}}
    if args.name:
        params["name"] = args.name
    if args.quantize is not None:
        params["quantize"] = {"bits": args.quantize, **({"groupSize": args.group_size} if args.group_size else {})}
    if args.dequantize:
        params["dequantize"] = True
    if args.overwrite:
        params["overwrite"] = True
    return params


def is_path(ref: str) -> bool:
    """An adapter given as a directory, not a name under the adapters folder."""
    return ref.startswith(("/", "~", ".")) or os.sep in ref


def _show(out: Any, action: str, result: dict[str, Any]) -> None:
    from .repl.formatting import adapters_table, models_table, size  # on use: see run

    if action == "list":
        print_table(out, models_table(result["models"]))
        if result.get("adapters"):
            out.print()
            print_table(out, adapters_table(result["adapters"]))
    elif action == "pull":
        fetched = size(result["downloadedBytes"]) if result["downloadedBytes"] else "nothing new"
        out.print(f"{result['model']}: {size(result['bytes'])} in {result['files']} files at {result['path']} "
                  f"({fetched} downloaded{', converted' if result.get('converted') else ''})")
    elif action == "fuse":
        quant = result.get("quantization")
        bits = f", {quant['bits']}-bit" if quant else ""
        out.print(f"fused into {result['model']}: {size(result['bytes'])}{bits} at {result['path']} "
                  f"in {result['seconds']:.1f} s; it loads as {result['model']}", markup=False, soft_wrap=True)
    elif action.startswith("rm"):
        if result["deleted"]:
            what = "adapter " if action == "rm --adapter" else ""
            out.print(f"deleted {what}{result['model']}: {size(result['bytesFreed'])} freed"
                      + (" (unloaded first)" if result["unloaded"] else ""))
        else:
            out.print(f"{result['model']}: nothing to delete")
    else:
        out.print(f"{result['model']}: {result['state']} ({result['source']}) {result.get('path') or ''}")


def print_table(out: Any, table: tuple[list[str], list[list[str]]]) -> None:
    """Aligned columns: drawn by rich on a terminal, plain lines (never wrapped) for a pipe."""
    from rich.table import Table  # on use, as in `run`

    from .repl.formatting import plain_table

    headers, rows = table
    if not out.is_terminal:
        print("\n".join(plain_table(table)))
        return
    view = Table(*headers, box=None)
    for row in rows:
        view.add_row(*row)
    out.print(view)


class _ProgressBar:
    """A rich progress bar fed by `$/progress` (bytes for downloads, steps for the rest)."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._progress: Any = None
        self._task: Any = None

    def update(self, message: dict[str, Any]) -> None:
        if message.get("method") != "$/progress" or not self._console.is_terminal:
            return
        params = message.get("params") or {}
        description = params.get("file") or params.get("phase", "")
        fields = {"description": str(description)[-40:], "completed": params.get("completed", 0),
                  "total": params.get("total")}
        if self._progress is None:
            self._start(params.get("unit") == "bytes", fields)
        else:
            self._progress.update(self._task, **fields)

    def _start(self, in_bytes: bool, fields: dict[str, Any]) -> None:
        from rich.progress import (  # on use, as in `run`
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns: list[Any] = [TextColumn("{task.description:<40}"), BarColumn()]
        columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()] if in_bytes else \
            [MofNCompleteColumn()]
        self._progress = Progress(*columns, console=self._console, transient=True)
        self._task = self._progress.add_task(**fields)
        self._progress.start()

    def stop(self) -> None:
        if self._progress is not None:
            progress, self._progress = self._progress, None
            progress.stop()
