"""`localmlx models list|pull|rm|status`: the model cache from a shell.

Each command spawns a sidecar and calls the protocol method (`models/list`,
`models/download`, `models/delete`, `models/status`), so the shell and Wooster go through
the same code. Results go to stdout (a table, or JSON with `--json`); progress bars and
errors go to stderr. Exit code 0 on success, 1 on an error.
"""

from __future__ import annotations

import argparse
import json
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
    remove = actions.add_parser("rm", parents=[common], help="delete a model's files")
    remove.add_argument("model")
    remove.add_argument("--force", action="store_true", help="unload it first if a sidecar has it loaded")
    status = actions.add_parser("status", parents=[common], help="where one model stands")
    status.add_argument("model")


def run(args: argparse.Namespace) -> int:
    # On use: every `localmlx` command, `serve` included, imports this module for its flags.
    from rich.console import Console

    from .client import RpcCallError, SidecarClient, sidecar_command

    out, err = Console(), Console(stderr=True)
    bar = _ProgressBar(err)
    with SidecarClient(sidecar_command(), env=env_from_args(args), on_notification=bar.update) as client:
        client.initialize(name="localmlx-models")
        try:
            method, params = _call(args)
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
        _show(out, args.action, result)
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
        return "models/delete", {"model": args.model, "force": args.force}
    return "models/status", {"model": args.model}


def _show(out: Any, action: str, result: dict[str, Any]) -> None:
    from rich.table import Table  # on use, as in `run`

    from .repl.formatting import size  # on use: see run

    if action == "list":
        table = Table(box=None)
        for column in ("model", "source", "size", "type", "quant", "context", "loaded"):
            table.add_column(column)
        for m in result["models"]:
            quant = m.get("quantization")
            table.add_row(m["model"], m["source"], size(m["bytes"]), m.get("type") or "?",
                          f"{quant['bits']}-bit" if quant else "", str(m.get("contextLength") or ""),
                          "yes" if m.get("loaded") else "")
        out.print(table)
    elif action == "pull":
        fetched = size(result["downloadedBytes"]) if result["downloadedBytes"] else "nothing new"
        out.print(f"{result['model']}: {size(result['bytes'])} in {result['files']} files at {result['path']} "
                  f"({fetched} downloaded{', converted' if result.get('converted') else ''})")
    elif action == "rm":
        if result["deleted"]:
            out.print(f"deleted {result['model']}: {size(result['bytesFreed'])} freed"
                      + (" (unloaded first)" if result["unloaded"] else ""))
        else:
            out.print(f"{result['model']}: nothing to delete")
    else:
        out.print(f"{result['model']}: {result['state']} ({result['source']}) {result.get('path') or ''}")


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
