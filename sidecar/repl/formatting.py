"""Words for what the sidecar answers: one-line summaries, sizes, errors, model tables.

Pure functions of protocol data, shared by the coloured and the plain output.
"""

from __future__ import annotations

import math
from typing import Any

import orjson


def size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def count(n: int | None) -> str:
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


# C0 controls other than tab and newline become their Unicode pictures (ESC -> ␛, CR -> ␍),
# C1 controls become U+FFFD: model text must not move the cursor or drive the terminal.
_CONTROL_PICTURES = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)}
_CONTROL_PICTURES.update({0x7F: "\u2421", **{c: "\ufffd" for c in range(0x80, 0xA0)}})


def visible(text: str) -> str:
    return text.translate(_CONTROL_PICTURES)


class WordWrap:
    """Streamed text broken between words to fit `width` columns, as it arrives. A word is held
    back until it ends (a space or newline comes, or `flush`); one wider than a line is left to
    the terminal. Spaces where a line breaks are dropped; indentation after a newline is kept."""

    def __init__(self, width: int) -> None:
        self.width = max(width, 8)
        self.column = 0
        self._space = ""
        self._word = ""

    @property
    def at_line_start(self) -> bool:
        return self.column == 0 and not self._word and not self._space

    def feed(self, text: str) -> str:
        out = []
        for char in text:
            if char == "\n":
                out.append(self.flush() + "\n")
                self.column, self._space = 0, ""
            elif char in " \t":
                out.append(self.flush())
                self._space += char
            else:
                self._word += char
        return "".join(out)

    def flush(self) -> str:
        """The held word, after the held spaces or on a line of its own when it does not fit."""
        if not self._word:
            return ""
        from rich.cells import cell_len  # here: only a terminal wraps, and scripts never import rich

        space, word, self._space, self._word = self._space.expandtabs(4), self._word, "", ""
        if self.column and self.column + len(space) + cell_len(word) > self.width:
            self.column = cell_len(word)
            return "\n" + word
        self.column += len(space) + cell_len(word)
        return space + word


def compact_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def generation_summary(result: dict[str, Any]) -> str:
    """`[stop] 12 + 40 tokens · TTFT 31.2 ms · 250.1 tokens/s · peak 11.3 MiB`"""
    usage, timings = result.get("usage", {}), result.get("timings", {})
    parts = [f"[{result.get('finishReason', '?')}] {usage.get('promptTokens', '?')} prompt + "
             f"{usage.get('completionTokens', '?')} generated tokens"]
    if usage.get("imageTokens"):
        parts.append(f"{usage['imageTokens']} of the prompt's from images")
    if usage.get("reasoningTokens"):
        parts.append(f"{usage['reasoningTokens']} reasoning")
    if usage.get("cachedTokens"):
        parts.append(f"{usage['cachedTokens']} cached")
    if result.get("toolCalls"):
        calls = len(result["toolCalls"])
        parts.append(f"{calls} tool call{'s' if calls != 1 else ''}")
    if result.get("cached"):
        parts.append("from the response cache")
    parts.append(f"TTFT {timings.get('ttftMs', 0):.1f} ms")
    parts.append(f"{timings.get('tokensPerSecond', 0):.1f} tokens/s")
    if "peakMemoryBytes" in timings:
        parts.append(f"peak memory {size(timings['peakMemoryBytes'])}")
    if timings.get("maskMsPerToken") is not None:
        parts.append(f"mask {timings['maskMsPerToken']:.2f} ms/token")
    return " · ".join(parts)


def tool_call_line(call: dict[str, Any]) -> str:
    """`tool call get_weather {"city":"Paris"} (call_1)`, then `: invalid: …` for a bad one."""
    function = call.get("function") or {}
    line = f"tool call {function.get('name')} {visible(str(function.get('arguments', '')))} ({call.get('id')})"
    return f"{line}: invalid: {call['error']}" if call.get("error") else line


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    denominator = norm(a) * norm(b)
    return sum(x * y for x, y in zip(a, b, strict=True)) / denominator if denominator else 0.0


def embedding_lines(texts: list[str], result: dict[str, Any], shown: int = 6) -> list[str]:
    """Per text: dimensions, norm, the first components; with two or more, their cosine
    similarities (`cos(1,2) 0.8123  "the sea" ~ "the ocean"`)."""
    vectors = result["vectors"]
    lines = []
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True), 1):
        head = ", ".join(f"{x:.4f}" for x in vector[:shown])
        more = ", …" if len(vector) > shown else ""
        lines.append(f"[{i}] {_quoted(text)}: {len(vector)} dimensions · norm {norm(vector):.4f} · [{head}{more}]")
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            lines.append(f"cos({i + 1},{j + 1}) {cosine(vectors[i], vectors[j]):.4f}  "
                         f"{_quoted(texts[i])} ~ {_quoted(texts[j])}")
    return lines


def _quoted(text: str, width: int = 40) -> str:
    text = visible(text.replace("\n", " "))
    return orjson.dumps(text if len(text) <= width else text[:width - 1] + "…").decode()


def loaded_summary(description: dict[str, Any]) -> str:
    verb = "already loaded" if description.get("alreadyLoaded") else "loaded"
    quant = description.get("quantization")
    parts = [f"{verb} {description['model']}: {description.get('type', '?')}",
             f"{count(description.get('parameters'))} parameters",
             size(description.get("bytes"))]
    if quant:
        parts.append(f"{quant.get('bits')}-bit")
    parts.append(f"context {description.get('contextLength') or '?'}")
    if description.get("loadTimeMs") is not None and not description.get("alreadyLoaded"):
        parts.append(f"{description['loadTimeMs']:.0f} ms")
    return ", ".join(parts)


DEMO_NOTE = ("demo is a tiny model with random weights: its replies are nonsense, as expected. "
             "For a real model: localmlx models pull mlx-community/Qwen2.5-3B-Instruct-4bit "
             "(about 2 GB), then localmlx repl --model mlx-community/Qwen2.5-3B-Instruct-4bit "
             "(or /pull and /load here).")


def banner(server_info: dict[str, Any], pid: int) -> str:
    return (f"localmlx {server_info.get('version')} · mlx {server_info.get('mlx')} · "
            f"mlx-lm {server_info.get('mlxLm')} · {server_info.get('device')} · sidecar pid {pid}")


def error_lines(error: dict[str, Any]) -> list[str]:
    """`error -32602: Invalid params: ...`, then one line per detail the data object holds."""
    lines = [f"error {error.get('code')}: {error.get('message')}"]
    data = error.get("data")
    if isinstance(data, dict):
        details = data.get("errors")
        for item in details if isinstance(details, list) else []:
            if isinstance(item, dict):
                lines.append(f"  {item.get('path') or '/'}: {item.get('message')}")
        rest = {k: v for k, v in data.items() if k != "errors"}
        if rest:
            lines.append(f"  data: {compact_json(rest)}")
    elif data is not None:
        lines.append(f"  data: {compact_json(data)}")
    return lines


Table = tuple[list[str], list[list[str]]]


def models_table(models: list[dict[str, Any]]) -> Table:
    def quant(m: dict[str, Any]) -> str:
        q = m.get("quantization")
        return f"{q.get('bits')}-bit" if q else ""

    def kind(m: dict[str, Any]) -> str:  # `qwen2_vl, vision`: the models /image is for
        return ", ".join(filter(None, [m.get("type") or "", "vision" if "vision" in (m.get("capabilities") or ()) else ""]))

    rows = [[m["model"], m.get("source", ""), size(m.get("bytes")), kind(m), quant(m),
             str(m.get("contextLength") or ""), "yes" if m.get("loaded") else ""] for m in models]
    return ["model", "source", "size", "type", "quant", "context", "loaded"], rows


def loaded_models_table(models: list[dict[str, Any]]) -> Table:
    rows = [[m["model"], m.get("type", ""), count(m.get("parameters")), size(m.get("bytes")),
             str(m.get("contextLength") or "")] for m in models]
    return ["loaded model", "type", "parameters", "memory", "context"], rows


def status_lines(status: dict[str, Any]) -> list[str]:
    requests, memory = status.get("requests", {}), status.get("memory", {})
    return [
        f"uptime {status.get('uptimeMs', 0) / 1000:.1f} s · requests: {requests.get('active', 0)} active, "
        f"{requests.get('queued', 0)} queued",
        f"memory: active {size(memory.get('activeBytes'))} · peak {size(memory.get('peakBytes'))} · "
        f"cache {size(memory.get('cacheBytes'))} · prompt cache {size(memory.get('promptCacheBytes'))} · "
        f"rss {size(memory.get('rssBytes'))}",
    ]


def plain_table(table: Table) -> list[str]:
    headers, rows = table
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (headers, *rows)]


# ---- adapters and fine-tuning ----------------------------------------------------------------


def _loss(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def duration(seconds: float | None) -> str:
    """`4.2 s`, `42 s`, `3:05`, `1:02:03`: how ETAs and run times read."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def trained_by(training: dict[str, Any] | None) -> str:
    """What made an adapter, in a few words: `120 its on notes, val loss 0.012`."""
    if not training:
        return "made elsewhere"
    dataset = str(training.get("dataset") or "?").rstrip("/").rsplit("/", 1)[-1]
    return f"{training.get('iterations')} its on {dataset}, val loss {_loss(training.get('valLoss'))}"


def adapters_table(adapters: list[dict[str, Any]]) -> Table:
    rows = [[a["name"], a.get("base") or "?", a.get("fineTuneType", ""), str(a.get("rank") or ""),
             size(a.get("bytes")), ", ".join(a.get("loadedAs") or ()), trained_by(a.get("training"))]
            for a in adapters]
    return ["adapter", "base", "type", "rank", "size", "loaded as", "trained"], rows


def variant_names(adapters: list[dict[str, Any]]) -> list[str]:
    """`<base>+<adapter>` for each adapter whose base is known: names that load."""
    return [f"{a['base']}+{a['name']}" for a in adapters if a.get("base")]


def training_progress(params: dict[str, Any]) -> str:
    """A `$/progress` of models/finetune in words: `loss 1.234 · val 1.301 · 812 tok/s · ETA 0:42`."""
    if params.get("unit") != "iteration":
        return ""
    parts = []
    if params.get("trainLoss") is not None:
        parts.append(f"loss {_loss(params['trainLoss'])}")
    if params.get("valLoss") is not None:
        parts.append(f"val {_loss(params['valLoss'])}")
    if params.get("tokensPerSecond") is not None:
        parts.append(f"{params['tokensPerSecond']:.0f} tok/s")
    if params.get("etaSeconds") is not None:
        parts.append(f"ETA {duration(params['etaSeconds'])}")
    return " · ".join(parts)


def finetune_summary(result: dict[str, Any]) -> list[str]:
    """What a models/finetune run made, and how to use it."""
    training = result["training"]
    kind = "DoRA" if training.get("fineTuneType") == "dora" else "LoRA"
    layers = "all" if training.get("numLayers") == -1 else training.get("numLayers")
    resumed = f", resumed at {training['resumedFrom']}" if training.get("resumedFrom") is not None else ""
    return [
        f"adapter {result['adapter']}: {kind} rank {training.get('rank')} on {layers} layers of {result['base']}, "
        f"{training.get('iterations')} iterations in {duration(training.get('seconds'))}{resumed}",
        f"  train loss {_loss(training.get('trainLoss'))} · val loss {_loss(training.get('valLoss'))} · "
        f"{result['tokensPerSecond']:.0f} tokens/s · peak memory {size(result['peakMemoryBytes'])}",
        f"  saved in {result['path']}",
        f"  use it as the model {result['model']} (models/load {{\"model\": \"{result['base']}\", "
        f"\"adapter\": \"{result['adapter']}\"}})",
    ]


# ---- profiles ------------------------------------------------------------------------------


def profile_model(profile: dict[str, Any]) -> str:
    """`base+adapter`, as a variant's name reads, or the base alone."""
    return f"{profile['model']}+{profile['adapter']}" if profile.get("adapter") else str(profile["model"])


def defaults_summary(defaults: dict[str, Any], width: int = 72) -> str:
    """`temperature=0.2 maxTokens=512 stop=["\\n\\n"]`, cut to `width`."""
    text = " ".join(f"{key}={compact_json(value)}" for key, value in defaults.items())
    return visible(text if len(text) <= width else text[:width - 1] + "…")


def profile_setup(profile: dict[str, Any]) -> str:
    """What else it sets, in a few words: `template, system, context 8192, keep 10m, draft d`."""
    parts = []
    if profile.get("template") is not None:
        parts.append("template" if profile.get("templateSource") in (None, "inline") else "template file")
    if profile.get("system") is not None:
        parts.append("system")
    if profile.get("contextLength") is not None:
        parts.append(f"context {profile['contextLength']}")
    if profile.get("keepAlive") is not None:
        parts.append(f"keep {profile['keepAlive']}")
    if profile.get("draftModel"):
        parts.append(f"draft {profile['draftModel']}")
    return ", ".join(parts)


def profiles_table(profiles: list[dict[str, Any]]) -> Table:
    rows = [[p["name"], profile_model(p), ",".join(p.get("tasks") or ()), defaults_summary(p.get("defaults") or {}),
             profile_setup(p)] for p in profiles]
    return ["profile", "model", "tasks", "defaults", "also"], rows


def profile_error_lines(errors: list[dict[str, Any]]) -> list[str]:
    """Files that did not load: `malformed profile broken: <why, with the line>`."""
    return [f"malformed profile {e['name']}: {visible(e['message'])}" for e in errors]


def profile_summary(profile: dict[str, Any]) -> str:
    """One line: the model, the tasks, the defaults, the rest."""
    parts = [profile_model(profile)]
    if profile.get("tasks"):
        parts.append(f"tasks {','.join(profile['tasks'])}")
    if profile.get("defaults"):
        parts.append(defaults_summary(profile["defaults"]))
    if setup := profile_setup(profile):
        parts.append(setup)
    return " · ".join(parts)


def snake_case(key: str) -> str:
    """contextLength -> context_length: how a wire key reads in a profile's TOML file."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


_TOML_ORDER = ("model", "adapter", "system", "template", "contextLength", "keepAlive", "draftModel", "tasks")


def profile_toml(profile: dict[str, Any]) -> str:
    """A profile as its file would read (keys in snake_case, a template file by its path),
    after a comment naming the file."""
    import tomllib

    import tomli_w  # on use: only showing a profile needs it

    document: dict[str, Any] = {}
    for key in _TOML_ORDER:
        value = profile.get(key)
        if key == "template" and value is not None and profile.get("templateSource") not in (None, "inline"):
            document["template_file"] = profile["templateSource"]
        elif value is not None and value != []:
            document[snake_case(key)] = value
    if profile.get("defaults"):
        document["defaults"] = {snake_case(key): value for key, value in profile["defaults"].items()}
    text = tomli_w.dumps(document, multiline_strings=True)  # as the store writes it: a template reads as written
    if tomllib.loads(text) != document:  # unless that changes it (\r\n): escaped then
        text = tomli_w.dumps(document)
    return f"# profile {profile['name']}: {profile['path']}\n{text}"
