"""One exchange at a time with the sidecar, shown as it happens.

Requests the REPL builds (`request`, `generate`) and lines typed as raw JSON (`send_line`)
all wait the same way: messages are drawn as they arrive (streamed text, reasoning dimmed
and apart, tool calls as they are made, progress bar, JSON), Ctrl-C cancels the request in
flight (nothing of its reply is drawn after the notice), Ctrl-D cancels it and leaves, and a
failed call is shown, not raised. What each line came to (`result`, `error`) is kept for
`--json`.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..client import Channels, SidecarExited
from ..jsonrpc import id_key
from . import formatting as fmt
from .state import ReplState, accepts_progress
from .wire import ReplClient, Reply

LINGER_S = 0.3  # how long to watch for an answer to a raw line that expects none


def is_response(message: Any) -> bool:
    return isinstance(message, list) or (isinstance(message, dict) and "method" not in message)


def same_id(a: Any, b: Any) -> bool:
    return id_key(a) == id_key(b)


def _is_request(message: Any) -> bool:
    return not (isinstance(message, dict) and "method" in message and "id" not in message)


def expects_reply(parsed: Any) -> bool:
    """Does a raw line get an answer? Anything but notifications (and all-notification batches)."""
    if isinstance(parsed, list):
        return not parsed or any(_is_request(item) for item in parsed)
    return _is_request(parsed)


def request_ids(parsed: Any) -> list[Any]:
    items = parsed if isinstance(parsed, list) else [parsed]
    return [item["id"] for item in items if isinstance(item, dict) and "method" in item and "id" in item]


class ReplSession:
    def __init__(self, client: ReplClient, output: Any, state: ReplState) -> None:
        self.client = client
        self.output = output
        self.state = state
        self.keys: Any = None  # on a terminal: what is typed while a reply streams (prompt.TypeAhead)
        self.quit_requested = False  # Ctrl-D while waiting
        self.result: Any = None  # what the current line came to
        self.error: dict[str, Any] | None = None
        self._tokens = itertools.count(1)
        self._stopping = False  # cancelled: draw no more of the reply
        client.on_send = self._trace_out
        client.on_late = self._trace_in

    def _trace_out(self, data: bytes) -> None:
        if self.state.raw:
            self.output.traffic("out", data)

    def _trace_in(self, message: Any) -> None:
        if self.state.raw:
            self.output.traffic("in", message)

    def begin_line(self, number: int | None = None) -> None:
        self.result, self.error = None, None
        self.output.at_line(number)

    def failed(self, text: str | None = None, error: dict[str, Any] | None = None) -> None:
        self.state.had_errors = True
        self.error = error if error is not None else {"message": text}
        if error is not None:
            self.output.rpc_error(error)
        if text is not None:
            self.output.error(text)

    # ---- requests the REPL builds ------------------------------------------------------------

    def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The result, or None once the error (or the cancellation) has been shown."""
        reply = self._exchange(method, self._with_progress(method, params))
        return None if reply is None else reply["result"]

    def generate(self, method: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """Stream a `chat` or `generate`: text (and reasoning, tool calls) as it arrives, then
        the summary line. The text and the result, with `reasoning` and `toolCalls` put back."""
        channels = Channels()
        reply = self._exchange(method, self._with_progress(method, dict(params, stream=True)), channels,
                               on_wait=lambda: self.output.waiting("processing prompt…"))  # until the first token
        self.output.end_text()
        if reply is None:
            return None
        self.result = result = channels.result(reply["result"])
        self.output.summary(fmt.generation_summary(result))
        return channels.text, result

    def _with_progress(self, method: str, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """Ask for `$/progress` wherever the method takes a token (loads, downloads, and
        generations that may load their model first), so long work shows a bar."""
        if not accepts_progress(method) or "_meta" in (params or {}):
            return params
        return {**(params or {}), "_meta": {"progressToken": f"repl-{next(self._tokens)}"}}

    def _exchange(self, method: str, params: dict[str, Any] | None,
                  parts: Channels | None = None, on_wait: Any = None) -> dict[str, Any] | None:
        id_ = self.client.start_request(method, params)
        meta = (params or {}).get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        self._stopping = False
        reply = self.client.wait_for(
            lambda m: isinstance(m, dict) and "method" not in m and same_id(m.get("id"), id_),
            lambda m: self._show(m, id_, token, parts),
            cancel=lambda key: self._cancel(id_, key), keys=self.keys, on_wait=on_wait)
        self.output.progress_done()
        return self._settle(id_, reply)

    def _cancel(self, id_: Any, key: str) -> None:
        self._stopping = True  # whatever of the reply is still on its way is not drawn
        self.output.progress_done()
        self.output.end_text()
        then = "then exiting" if key == "^D" else "^C again stops waiting"
        self.output.info(f"{key}: cancelling request {id_} ($/cancelRequest); {then}")
        self.client.cancel(id_)

    def _settle(self, id_: Any, reply: Reply) -> dict[str, Any] | None:
        self.quit_requested = self.quit_requested or reply.quit
        if reply.abandoned:
            self.client.abandon(id_)
            self.failed(f"stopped waiting for request {id_}; its reply will be ignored")
            return None
        self.client.forget(id_)
        message = reply.message
        if "error" in message:
            self.failed(error=message["error"])
            return None
        self.result = message["result"]
        answer: dict[str, Any] = message
        return answer

    def _show(self, message: Any, id_: Any, token: Any, parts: Channels | None) -> None:
        if self.state.raw:
            self.output.traffic("in", message)
        if not isinstance(message, dict) or "method" not in message:
            if not same_id(message.get("id") if isinstance(message, dict) else None, id_):
                self._show_stray(message)
            return
        params = message.get("params") or {}
        if self._stopping:
            return
        if message["method"] == "generate/chunk" and same_id(params.get("requestId"), id_):
            if parts is not None:
                parts.add(params)
            if not self.state.raw:
                self._show_chunk(params)
        elif message["method"] == "$/progress" and token is not None and params.get("token") == token:
            self.output.progress(params)

    def _show_chunk(self, params: dict[str, Any]) -> None:
        """A chunk's channels in the order the model made them: reasoning, text, tool calls."""
        if params.get("reasoning"):
            self.output.reasoning(params["reasoning"])
        if params.get("text"):
            self.output.text(params["text"])
        for call in params.get("toolCalls") or ():
            self.output.tool_call(call)

    def _show_stray(self, message: Any) -> None:
        """A response nobody is waiting for (late replies to abandoned requests never get here)."""
        if not self.state.raw:
            self.output.value(message)

    # ---- lines typed as JSON -----------------------------------------------------------------

    def send_line(self, line: str) -> None:
        """Send exactly what was typed; show every message that comes back, pretty-printed."""
        try:
            parsed: Any = json.loads(line)
        except ValueError as exc:
            parsed = None
            self.output.info(f"(not valid JSON: {exc}; sent as typed)")
        ids = request_ids(parsed)
        self.client.send_raw(line.encode("utf-8", "surrogateescape") + b"\n")
        wanted = parsed is None or expects_reply(parsed)
        reply = self.client.wait_for(is_response, self._show_raw,
                                     cancel=(lambda key: self._cancel_all(ids, key)) if ids else None,
                                     linger_s=None if wanted else LINGER_S, keys=self.keys)
        self.quit_requested = self.quit_requested or reply.quit
        if reply.abandoned:
            for id_ in ids:
                self.client.abandon(id_)
            self.failed("stopped waiting; the reply will be ignored")
            return
        self.result = reply.message
        if _has_error(reply.message):
            self.state.had_errors = True
            self.error = {"message": "the sidecar answered with an error"}

    def _cancel_all(self, ids: list[Any], key: str) -> None:
        then = "then exiting" if key == "^D" else "^C again stops waiting"
        self.output.info(f"{key}: cancelling ($/cancelRequest); {then}")
        for id_ in ids:
            self.client.cancel(id_)

    def _show_raw(self, message: Any) -> None:
        if self.state.raw:
            self.output.traffic("in", message)
        elif is_response(message):
            self.output.value(message)
        else:
            self.output.notification(message)

    # ---- between commands --------------------------------------------------------------------

    def show_late(self) -> None:
        """Whatever arrived while nobody waited, shown before the next prompt."""
        for message in self.client.drain():
            self._trace_in(message)
            if is_response(message):
                self._show_stray(message)

    def check_alive(self) -> None:
        if not self.client.alive:
            raise SidecarExited(f"the sidecar exited (code {self.client.process.poll()})")

    def close(self) -> int:
        """shutdown, exit, reap: the sidecar's exit code."""
        code = self.client.close()
        for message in self.client.drain():  # the shutdown reply: shown only as traffic
            if self.state.raw:
                self.output.traffic("in", message)
        return code


def _has_error(message: Any) -> bool:
    items = message if isinstance(message, list) else [message]
    return any(isinstance(item, dict) and "error" in item for item in items)
