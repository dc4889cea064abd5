"""`localmlx repl`, driven as a person would: in a pseudo-terminal (pexpect), against the
real sidecar and the embedded demo model; and scripted, with stdin not a terminal.

Every child is reaped: the REPL by pexpect or subprocess, the sidecar by the REPL (checked)
or, should a test fail half-way, by the `terminal` fixture's clean-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.protocol_defs import INVALID_PARAMS, MODEL_NOT_FOUND, PARSE_ERROR, REQUEST_CANCELLED
from sidecar.repl import formatting as fmt
from sidecar.repl.prompt import candidates, matching
from sidecar.repl.session import expects_reply, request_ids
from sidecar.repl.state import ReplState, canonical_setting, parse_setting

from .tuning_models import LEARNER, build_learner, write_fact_dataset

pexpect = pytest.importorskip("pexpect")

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY = "from sidecar.repl import main; raise SystemExit(main())"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]|[\r\x08]")
PROMPT = r"demo(?: \[\d+\]| oneshot)?(?: raw)?>"
SPINNER = re.compile(r"\S processing prompt… [\d:]+")  # before the first token
SUMMARY = r"\[(\w+)\] (\d+) prompt \+ (\d+) generated tokens.* · TTFT [\d.]+ ms · [\d.]+ tokens/s · peak memory"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repl-models")  # the sidecar builds the demo model here


@pytest.fixture
def env(models_dir, tmp_path) -> dict[str, str]:
    return {**os.environ, "LOCALMLX_MODELS_DIR": str(models_dir),
            "LOCALMLX_REPL_HISTORY": str(tmp_path / "history"),
            "LOCALMLX_MAX_TOKENS": "12", "LOCALMLX_TEMPERATURE": "0",
            "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}


def gone(pid: int) -> bool:
    """Not running and not a zombie: someone reaped it."""
    if Path("/proc").is_dir():
        return not Path(f"/proc/{pid}").exists()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


class Terminal:
    """The REPL in a pseudo-terminal; expectations match the text a person sees
    (escape sequences stripped), each after the previous match."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.child = pexpect.spawn(sys.executable, ["-c", ENTRY, *args], cwd=str(REPO_ROOT), env=env,
                                   dimensions=(50, 160), encoding="utf-8", codec_errors="replace")
        self.raw = ""
        self.pos = 0
        self.eof = False
        self.sidecar_pid = int(self.expect(r"sidecar pid (\d+)").group(1))

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def _read(self, timeout: float) -> None:
        try:
            self.raw += self.child.read_nonblocking(1 << 16, timeout)
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"never saw {pattern!r}; after the last match:\n{self.text[self.pos:][-3000:]}")
            self._read(0.05)

    def wait_for_text(self, chars: int, after: str, timeout: float = 20.0) -> str:
        """Read until `chars` printable characters follow the last `after` (the typed line,
        however often the prompt redraws it); that text."""
        deadline = time.monotonic() + timeout
        while True:
            start = self.text.rfind(after, self.pos)
            new = SPINNER.sub("", self.text[start + len(after):]) if start >= 0 else ""
            if len(re.sub(r"\s", "", new)) >= chars:
                return new
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"no {chars} characters after {after!r}: {self.text[self.pos:]!r}")
            self._read(0.01)

    def type(self, line: str) -> None:
        self.child.send(line + "\r")

    def run(self, line: str, then: str) -> re.Match:
        """Type a command, see `then` in its output, wait for the next prompt."""
        self.type(line)
        match = self.expect(then)
        self.expect(PROMPT)
        return match

    def exit_code(self, timeout: float = 20.0) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus

    def kill(self) -> None:
        """Ctrl-D (again, should the terminal have swallowed one mid-output), else SIGKILL."""
        for _ in range(3):
            if not self.child.isalive():
                break
            self.child.sendcontrol("d")
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                self.child.expect(pexpect.EOF, timeout=2)
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)
        if not wait_gone(self.sidecar_pid, 10):  # orphaned: stdin EOF should end it; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.sidecar_pid, signal.SIGKILL)


@pytest.fixture
def terminal(env):
    started: list[Terminal] = []

    def start(*args: str, **more_env: str) -> Terminal:
        term = Terminal({**env, **more_env}, *args)
        started.append(term)
        return term

    yield start
    for term in started:
        term.kill()


def script(env: dict[str, str], lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=REPO_ROOT, env=env, text=True,
                          input="".join(line + "\n" for line in lines), capture_output=True, timeout=45)


# ---- in a terminal ---------------------------------------------------------------------------


def test_start_up_loads_the_model_with_progress_then_streams_a_reply(terminal):
    term = terminal()
    term.expect(r"ready")  # the progress bar's last phase
    term.expect(r"loaded demo: llama, [\d.]+M parameters")
    term.expect(PROMPT)
    match = term.run("Tell me about the sea.", SUMMARY)
    assert match.group(1) == "length" and match.group(3) == "12"


def test_ctrl_c_cancels_the_generation_and_the_session_goes_on(terminal):
    term = terminal()
    term.expect(PROMPT)
    term.run("/set maxTokens 2000", r"maxTokens = 2000")
    term.type("Tell me a long story.")
    streamed = term.wait_for_text(20, after="long story.")  # the first tokens are on the screen ...
    assert not re.search(SUMMARY, streamed), "the reply finished before Ctrl-C"  # ... and more are coming
    term.child.sendintr()
    term.expect(r"\^C: cancelling request \d+ \(\$/cancelRequest\)")
    match = term.expect(SUMMARY)
    assert match.group(1) == "cancelled" and 0 < int(match.group(3)) < 2000
    term.expect(PROMPT)
    # Still the same sidecar, idle, and it still answers.
    term.run("/status", r"requests: 0 active, 0 queued")
    term.run("/set maxTokens 5", r"maxTokens = 5")
    assert term.run("one more", SUMMARY).group(1) == "length"
    # Ctrl-C at the prompt drops the half-typed line, not the session.
    term.child.send("half typed")
    term.child.sendintr()
    term.expect(PROMPT)
    term.run("/status", r"requests: 0 active")
    assert not gone(term.sidecar_pid)


def test_ctrl_d_shuts_the_sidecar_down_and_reaps_it(terminal):
    term = terminal()
    term.expect(PROMPT)
    term.run("/raw", r"raw traffic on")
    term.child.sendcontrol("d")
    term.expect(r'→ \{"jsonrpc":"2\.0","id":\d+,"method":"shutdown"\}')
    term.expect(r'→ \{"jsonrpc":"2\.0","method":"exit"\}')
    assert term.exit_code() == 0
    assert gone(term.sidecar_pid)


def test_history_persists_across_restarts(terminal, env):
    first = terminal()
    first.expect(PROMPT)
    first.run("/set temperature 0.5", r"temperature = 0\.5")
    first.child.sendcontrol("d")
    assert first.exit_code() == 0
    assert "+/set temperature 0.5" in Path(env["LOCALMLX_REPL_HISTORY"]).read_text()

    second = terminal()
    second.expect(PROMPT)
    second.child.send("\x1b[A")  # Up: the last line of the earlier session
    second.child.send("\r")
    second.expect(r"temperature = 0\.5")


def test_raw_json_round_trip_and_traffic_view(terminal):
    term = terminal()
    term.expect(PROMPT)
    term.type('{"jsonrpc": "2.0", "id": "abc", "method": "ping"}')
    term.expect(r'"id": "abc",\s+"result": \{\}')  # pretty-printed
    term.expect(PROMPT)
    term.type('[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"nothing"}]')
    term.expect(r'\[\s+\{\s+"jsonrpc": "2\.0",\s+"id": 1,\s+"result": \{\}\s+\}\s+\]')  # a batch answer
    term.expect(PROMPT)
    term.run("/raw on", r"raw traffic on")
    term.type("/status")
    term.expect(r'→ \{"jsonrpc":"2\.0","id":(\d+),"method":"server/status"\}')
    term.expect(r'← \{"jsonrpc":"2\.0","id":\d+,"result":\{"models"')
    term.expect(r"uptime [\d.]+ s")


def test_bad_json_and_unknown_commands_are_shown_as_errors(terminal):
    term = terminal()
    term.expect(PROMPT)
    term.type('{"jsonrpc": "2.0", "id": 3, "method": ')
    term.expect(r"not valid JSON: .*sent as typed")
    term.expect(f'"code": {PARSE_ERROR}')
    term.expect(r'"message": "Parse error')
    term.expect(PROMPT)
    term.run("/lod demo", r"error: unknown command /lod; did you mean /load\?")
    term.run("/set temperature hot", r"error: temperature: 'hot' is not of type 'number'")
    term.run("/load no-such-model", rf"error {MODEL_NOT_FOUND}: .*no-such-model")
    term.run("/status", r"requests: 0 active")  # the session goes on


def test_tab_completes_commands_and_model_names(terminal):
    term = terminal()
    term.expect(PROMPT)
    term.child.send("/mod\t")
    term.expect(r"/models")
    term.child.send("\r")
    term.expect(r"demo\s+embedded\s+[\d.]+ MiB\s+llama\s+32768\s+yes")
    term.expect(PROMPT)
    term.child.send("/load de\t")
    term.expect(r"/load demo")  # completion is asynchronous: see it before pressing Enter
    term.child.send("\r")
    term.expect(r"already loaded demo")


def test_plain_lines_keep_the_conversation_until_new(terminal):
    term = terminal()
    term.expect(r"random weights: its replies are nonsense.*localmlx models pull mlx-community/")
    term.expect(r"demo>")
    term.type("hello")
    term.expect(SUMMARY)
    term.expect(r"demo \[1\]>")
    term.type("and again")
    term.expect(SUMMARY)
    term.expect(r"demo \[2\]>")
    term.run("/show", r"model: demo\s+mode: conversation\s+conversation: 2 exchanges \(4 messages\)")
    term.type("/new")
    term.expect(r"new conversation")
    term.expect(r"demo>")
    term.type("/oneshot")
    term.expect(r"one-shot: each line is a fresh one-turn chat")
    term.type("hello")
    term.expect(SUMMARY)
    term.expect(r"demo oneshot>")
    term.type("exit")
    assert term.exit_code() == 0


def test_a_spinner_turns_until_the_first_token_and_ctrl_c_lands_during_prefill(terminal):
    # Two prompt tokens per prefill step: a prompt of ~1500 tokens takes seconds to read.
    term = terminal(LOCALMLX_PREFILL_STEP_SIZE="2")
    term.expect(PROMPT)
    term.type("x1y2 " * 300)
    term.expect(r"processing prompt… \d+:\d\d:\d\d")  # on screen before any token
    term.child.sendintr()
    term.expect(r"\^C: cancelling request \d+ \(\$/cancelRequest\)")
    match = term.expect(r"\[(\w+)\] \d+ prompt \+ (\d+) generated tokens")
    assert match.groups() == ("cancelled", "0")  # stopped before the first token
    term.expect(r"the cancelled turn is not part of the conversation \(/keep adds it\)")
    term.expect(r"demo>")  # no exchange kept


def test_keys_while_a_reply_streams(terminal):
    """Type-ahead is not echoed into the reply (it waits at the next prompt); nothing of the
    reply prints after the cancel notice; a late reply to an abandoned request never shows;
    Ctrl-D cancels the reply and exits."""
    term = terminal()
    term.expect(PROMPT)
    term.run("/set maxTokens 2000", r"maxTokens = 2000")
    term.type("Tell me a long story.")
    term.wait_for_text(20, after="long story.")
    term.child.send("zqxj")
    term.wait_for_text(80, after="long story.")  # more of the reply came after the typing
    term.child.sendintr()
    notice = term.expect(r"\^C: cancelling request \d+ \(\$/cancelRequest\); \^C again stops waiting")
    summary = term.expect(SUMMARY)
    assert summary.group(1) == "cancelled"
    assert term.text[notice.end():summary.start()].strip() == ""  # no token after the notice
    assert "zqxj" not in term.text[:summary.start()]
    term.expect(r"demo> zqxj")  # the type-ahead, at the next prompt
    term.child.sendintr()  # drop it
    term.expect(PROMPT)
    term.type("/keep")
    term.expect(r"kept the cancelled reply \(1 exchanges\)")
    term.expect(r"demo \[1\]>")

    term.type("Tell me another long story.")
    term.wait_for_text(20, after="another long story.")
    os.kill(term.sidecar_pid, signal.SIGSTOP)  # its reply to the cancel comes late: once resumed
    try:
        term.child.sendintr()
        term.expect(r"\^C: cancelling request \d+")
        term.child.sendintr()
        term.expect(r"stopped waiting for request \d+; its reply will be ignored")
        term.expect(PROMPT)
    finally:
        os.kill(term.sidecar_pid, signal.SIGCONT)
    for _ in range(50):  # until the sidecar has answered the abandoned request
        if term.run("/status", r"requests: (\d+) active").group(1) == "0":
            break
    term.run("/show", r"conversation: 1 exchange \(2 messages\)")
    assert "late reply" not in term.text and "[cancelled]" not in term.text[term.text.rfind("stopped waiting"):]

    term.type("And one more.")
    term.wait_for_text(20, after="one more.")
    term.child.sendcontrol("d")
    term.expect(r"\^D: cancelling request \d+ \(\$/cancelRequest\); then exiting")
    assert term.expect(SUMMARY).group(1) == "cancelled"
    assert term.exit_code() == 0
    assert wait_gone(term.sidecar_pid)


def test_a_model_not_on_disk_is_offered_for_download(terminal, env):
    term = terminal("--model", "nobody/missing-model", HF_HUB_OFFLINE="1")
    term.expect(r"nobody/missing-model is not on disk\. Download it from the Hugging Face Hub now\? \[y/N\]")
    term.type("n")
    term.expect(r"not downloaded: `localmlx models pull nobody/missing-model` fetches it later")
    assert term.exit_code() == 1
    done = script({**env, "HF_HUB_OFFLINE": "1"}, ["hello", "again"], "--model", "nobody/missing-model")
    assert done.returncode == 1
    assert "`localmlx models pull nobody/missing-model` downloads it" in done.stderr
    assert done.stderr.count("error") == 1  # the load at start-up, not one per line


# ---- scripted --------------------------------------------------------------------------------


def test_script_json_lines_name_their_input_lines(env, tmp_path):
    saved = tmp_path / "conversation.json"
    done = script(env, ["/set maxTokens 3", "hello", "# a comment", "", "/frobnicate", "and again",
                        '{"jsonrpc":"2.0","id":"p","method":"ping"}', f"/save {saved}", f"/save {saved}",
                        "/load no-such-model"], "--json")
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["line"], r["ok"]) for r in records] == [(1, True), (2, True), (5, False), (6, True), (7, True),
                                                       (8, True), (9, False), (10, False)]
    assert records[1]["input"] == "hello" and records[1]["result"]["finishReason"] == "length"
    assert records[1]["result"]["text"] == json.loads(saved.read_text())[1]["content"]
    assert records[4]["result"] == {"jsonrpc": "2.0", "id": "p", "result": {}}
    assert records[6]["error"]["message"].endswith("--force overwrites it")
    assert records[7]["error"]["code"] == MODEL_NOT_FOUND
    assert [m["role"] for m in json.loads(saved.read_text())] == ["user", "assistant", "user", "assistant"]
    assert "line 5: error: unknown command /frobnicate" in done.stderr
    assert re.search(rf"^line 10: error {MODEL_NOT_FOUND}: ", done.stderr, re.M)
    assert "\r" not in done.stderr and "\x1b" not in done.stderr  # no bars, no colour


def test_repl_help_documents_keys_history_and_exit_codes(env):
    done = subprocess.run([sys.executable, "-m", "sidecar", "repl", "--help"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for words in ("Ctrl-C", "Ctrl-D", "repl_history", "LOCALMLX_REPL_HISTORY", "exit status", "--json", "--oneshot"):
        assert words in done.stdout, words
    bad = subprocess.run([sys.executable, "-m", "sidecar", "repl", "--frobnicate"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2




def test_script_mode_prints_plain_output(env):
    done = script(env, ["/models", "/generate Once upon a time", "# a comment",
                        '{"jsonrpc":"2.0","id":9,"method":"tokenize","params":{"text":"sea"}}',
                        "/call ping", "/quit"], "--model", "demo")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr  # no colour, no cursor movement
    assert re.search(r"^demo\s+embedded\s+[\d.]+ MiB\s+llama\s+32768\s+yes", done.stdout, re.M)
    raw_reply, call_result = done.stdout[done.stdout.index('{\n  "jsonrpc"'):].rsplit("\n{}", 1)
    reply = json.loads(raw_reply)
    assert reply["id"] == 9 and reply["result"]["tokens"]
    assert call_result == "\n"  # /call ping printed its result, {}
    assert re.search(SUMMARY, done.stderr)
    assert re.search(r"loaded demo: llama", done.stderr)


def test_script_chat_mode_sends_the_history(env):
    done = script(env, ["/raw on", "hello", "and again", "/new", "hi", "/oneshot", "one", "two", "/bye", "never"])
    assert done.returncode == 0, done.stderr
    sent = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("→ ")]
    chats = [m["params"]["messages"] for m in sent if m.get("method") == "chat"]
    assert [len(m) for m in chats] == [1, 3, 1, 1, 1]  # the conversation by default; /new; /oneshot
    assert [m["role"] for m in chats[1]] == ["user", "assistant", "user"]
    # The first reply, as streamed, is the assistant turn sent back.
    received = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("← ")]
    first_id = next(m["id"] for m in sent if m.get("method") == "chat")
    streamed = "".join(m["params"]["text"] for m in received
                       if m.get("method") == "generate/chunk" and m["params"]["requestId"] == first_id)
    assert chats[1][1]["content"] == streamed


def test_script_settings_reach_the_request_and_errors_set_the_status(env):
    done = script(env, ["/set max_tokens 3", "/set stop END", "/set temperature -1", "/raw on",
                        "/generate The", "/frobnicate"])
    assert done.returncode == 1
    assert "error: temperature: -1 is less than the minimum of 0" in done.stderr
    assert "error: unknown command /frobnicate" in done.stderr
    sent = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("→ ")]
    generate = next(m for m in sent if m.get("method") == "generate")
    assert generate["params"] == {"model": "demo", "maxTokens": 3, "stop": ["END"], "prompt": "The",
                                  "stream": True, "_meta": {"progressToken": generate["params"]["_meta"]["progressToken"]}}


def test_script_sampling_settings_reach_the_request(env):
    done = script(env, ["/set presencePenalty 0.5", "/set frequency_penalty 0.3", '/set logitBias {"12": -100}',
                        "/set repetitionContextSize 64", "/set cache off", "/help set", "/set", "/raw on",
                        "/generate The", "/chat hello"])
    assert done.returncode == 0, done.stderr
    for line in ("presencePenalty = 0.5", "frequencyPenalty = 0.3", 'logitBias = {"12":-100}',
                 "repetitionContextSize = 64", "cache = false"):
        assert line in done.stderr  # as each is set
        assert line in done.stdout  # and in the `/set` listing
    listed = {line.split()[0] for line in done.stdout.splitlines() if line[:1].isalpha()}
    assert {"presencePenalty", "frequencyPenalty", "logitBias", "repetitionContextSize", "cache"} <= listed
    assert re.search(r"^presencePenalty\s+number -2\.\.2\s+Subtracted", done.stdout, re.M)  # /help set
    sent = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("→ ")]
    wanted = {"presencePenalty": 0.5, "frequencyPenalty": 0.3, "logitBias": {"12": -100},
              "repetitionContextSize": 64, "cache": False}
    for method in ("generate", "chat"):
        params = next(m["params"] for m in sent if m.get("method") == method)
        assert {k: params.get(k) for k in wanted} == wanted, method
    assert len(re.findall(SUMMARY, done.stderr)) == 2  # both served


def test_script_bad_sampling_settings_are_refused(env):
    done = script(env, ['/set logitBias {"abc": 1}', '/set logitBias {"5": 200}', "/set logitBias 5:200",
                        "/set cache maybe", "/set presencePenalty 3", "/set repetitionContextSize 0",
                        "/set", "/quit"], "--no-load")
    assert done.returncode == 1
    for message in ("error: logitBias: 'abc' does not match",
                    "error: logitBias/5: 200 is greater than the maximum of 100",
                    'error: logitBias: not a JSON object (for example {"12": -100})',
                    "error: cache: 'maybe' is not of type 'boolean'",
                    "error: presencePenalty: 3 is greater than the maximum of 2",
                    "error: repetitionContextSize: 0 is less than the minimum of 1"):
        assert message in done.stderr
    assert not re.search(r"^(logitBias|cache|presencePenalty|repetitionContextSize) =", done.stdout, re.M)


def test_script_reports_a_sidecar_that_exits(env):
    done = script(env, ['{"jsonrpc":"2.0","method":"exit"}', "/status"], "--no-load")
    assert done.returncode == 1
    assert re.search(r"error: the sidecar exited \(code 1\)", done.stderr)


# ---- the pieces --------------------------------------------------------------------------------


def test_completion_candidates():
    state = ReplState(methods=["chat", "models/list", "models/load"], model_names=["demo", "tiny"])
    assert matching(*candidates("/lo", state)) == ["/load", "/log"]
    assert matching(*candidates("/load t", state)) == ["tiny"]
    assert matching(*candidates("/set maxT", state)) == ["maxTokens"]
    assert matching(*candidates('{"id":1,"method": "models/l', state)) == ["models/list", "models/load"]
    assert matching(*candidates("/raw ", state)) == ["off", "on"]
    assert candidates("hello /lo", state) == ("", [])


def test_settings_parse_against_the_schema():
    assert canonical_setting("max-tokens") == canonical_setting("max_tokens") == "maxTokens"
    assert canonical_setting("nope") is None
    assert parse_setting("temperature", "0.2") == 0.2
    assert parse_setting("stop", '["a", "b"]') == ["a", "b"]
    assert parse_setting("system", "Be terse.") == "Be terse."
    with pytest.raises(ValueError, match="topK"):
        parse_setting("topK", "1.5")
    assert parse_setting("logitBias", '{"12": -100, "7": 2.5}') == {"12": -100, "7": 2.5}
    assert parse_setting("cache", "off") is False and parse_setting("cache", "ON") is True
    assert parse_setting("cache", "false") is False
    assert parse_setting("presencePenalty", "-0.5") == -0.5
    assert parse_setting("repetitionContextSize", "64") == 64
    assert canonical_setting("frequency-penalty") == "frequencyPenalty"
    assert canonical_setting("logit_bias") == "logitBias"
    with pytest.raises(ValueError, match=r"logitBias/5: 200 is greater"):
        parse_setting("logitBias", '{"5": 200}')
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_setting("logitBias", "12=-100")
    with pytest.raises(ValueError, match="cache"):
        parse_setting("cache", "maybe")
    with pytest.raises(ValueError, match="repetitionContextSize"):
        parse_setting("repetitionContextSize", "1.5")


def test_which_raw_lines_expect_a_reply():
    assert expects_reply({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert not expects_reply({"jsonrpc": "2.0", "method": "exit"})
    assert expects_reply([])
    assert not expects_reply([{"jsonrpc": "2.0", "method": "a"}])
    assert expects_reply({"jsonrpc": "2.0"})
    assert request_ids([{"id": 1, "method": "a"}, {"method": "b"}, {"id": "x", "method": "c"}]) == [1, "x"]


def test_word_wrap_breaks_streamed_text_between_words():
    wrap = fmt.WordWrap(12)
    pieces = [wrap.feed(chunk) for chunk in ("The sea is ", "wide and", " deep tonight,\n  my", " friend")]
    assert "".join(pieces) + wrap.flush() == "The sea is\nwide and\ndeep\ntonight,\n  my friend"
    assert pieces[1] == "\nwide"  # "and" is held until it ends: it might not fit
    assert not wrap.at_line_start


def test_formatting():
    result = {"finishReason": "stop", "usage": {"promptTokens": 5, "completionTokens": 7},
              "timings": {"ttftMs": 12.34, "tokensPerSecond": 100.0, "peakMemoryBytes": 3 << 20}}
    assert fmt.generation_summary(result) == \
        "[stop] 5 prompt + 7 generated tokens · TTFT 12.3 ms · 100.0 tokens/s · peak memory 3.0 MiB"
    error = {"code": INVALID_PARAMS, "message": "Invalid params", "data": {"errors": [{"path": "/x", "message": "bad"}]}}
    assert fmt.error_lines(error) == [f"error {INVALID_PARAMS}: Invalid params", "  /x: bad"]
    assert fmt.plain_table((["a", "bb"], [["xyz", "1"]])) == ["a    bb", "xyz  1"]
    assert fmt.visible("a\tb\nc\rd\x1b[2J\x9b") == "a\tb\nc\u240dd\u241b[2J\ufffd"


# ---- tools, JSON output, reasoning, embeddings -----------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="session")
def family_models(models_dir) -> dict[str, str]:
    """Tiny real-family checkpoints in the REPL's models dir: Qwen3 (tool calls), the same with
    a thinking template (the generation prompt opens `<think>`, as Qwen3-Thinking-2507's does),
    and a Qwen3-Embedding."""
    import shutil

    from tests.families import FAMILIES_BY_NAME, build, build_embedding_model

    qwen = build(models_dir, FAMILIES_BY_NAME["qwen3"], "bf16")
    thinking = models_dir / "qwen3-thinking-bf16"
    if not thinking.exists():
        shutil.copytree(qwen, thinking)
        config_path = thinking / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        closed = "{{- '<think>\\n\\n</think>\\n\\n' }}\n"
        assert closed in config["chat_template"]
        config["chat_template"] = config["chat_template"].replace(
            closed, closed + "    {%- else %}\n        {{- '<think>\\n' }}\n")
        config_path.write_text(json.dumps(config))
    return {"qwen": qwen.name, "thinking": thinking.name, "embedding": build_embedding_model(models_dir).name}


def sent_messages(stdout: str) -> list[dict]:
    return [json.loads(line[2:]) for line in stdout.splitlines() if line.startswith("→ ")]


def streamed_text(stdout: str, request_id: int) -> str:
    """The text of one request's chunks, as `/raw on` showed them."""
    received = [json.loads(line[2:]) for line in stdout.splitlines() if line.startswith("← ")]
    return "".join(m["params"].get("text", "") for m in received
                   if m.get("method") == "generate/chunk" and m["params"]["requestId"] == request_id)


def test_script_json_output_parses(env):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    done = script(env, ["/set maxTokens 200", "/raw on", "/json", "hello", f"/json {json.dumps(schema)}",
                        "/generate The", "/raw off", "/json off", "/json {not json"])
    assert done.returncode == 1  # the last line
    assert "JSON output: one JSON object per reply" in done.stderr
    assert "JSON output: replies follow the schema" in done.stderr
    assert "JSON output off: free text" in done.stderr
    assert "error: /json: neither JSON" in done.stderr
    sent = sent_messages(done.stdout)
    chat = next(m for m in sent if m.get("method") == "chat")
    generate = next(m for m in sent if m.get("method") == "generate")
    assert chat["params"]["responseFormat"] == {"type": "json_object"}
    assert generate["params"]["responseFormat"] == {"type": "json_schema", "schema": schema}
    first, second = json.loads(streamed_text(done.stdout, chat["id"])), json.loads(streamed_text(done.stdout, generate["id"]))
    assert isinstance(first, dict)
    assert set(second) == {"n", "ok"} and isinstance(second["n"], int) and isinstance(second["ok"], bool)
    assert re.search(SUMMARY + r".* · mask [\d.]+ ms/token", done.stderr)


def test_script_tools_are_sent_with_chat_only_and_calls_are_shown(env, family_models, tmp_path):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER_TOOL]))
    done = script(env, [f"/tools {tools_file}", "/set toolChoice required", "/tools", "/set maxTokens 200",
                        "/raw on", "/generate The", "What is the weather in Paris?", "/raw off",
                        "What is the weather in Paris?", "/tools off", "/tools", '/tools {"name": "bad name!"}'], "--model", family_models["qwen"])
    assert done.returncode == 1  # the bad tool
    assert "tools for the following chat turns: get_weather" in done.stderr
    assert "tools: get_weather (toolChoice \"required\")" in done.stderr
    assert "tools off" in done.stderr and "tools: none" in done.stderr
    assert "error: /tools: tools/0/function/name" in done.stderr
    sent = sent_messages(done.stdout)
    generate = next(m["params"] for m in sent if m.get("method") == "generate")
    chat = next(m["params"] for m in sent if m.get("method") == "chat")
    assert "tools" not in generate and "toolChoice" not in generate  # chat's params only
    assert chat["tools"] == [WEATHER_TOOL] and chat["toolChoice"] == "required"
    # Unraw, the call is on a line of its own, as the model made it; the summary counts it.
    call = re.search(r"^tool call get_weather (\{.*\}) \((\S+)\)$", done.stdout, re.M)
    assert call, done.stdout
    assert isinstance(json.loads(call.group(1))["city"], str)
    assert re.search(r"\[tool_calls\] .* · 1 tool call · ", done.stderr)


def test_script_reasoning_is_apart_from_the_answer(env, family_models):
    done = script(env, ["/think 6", "/set maxTokens 30", "/raw on", "Tell me about the sea.", "/raw off",
                        "Tell me about the sea.", "/think off", "/think default", "/think sometimes"],
                  "--model", family_models["thinking"])
    assert done.returncode == 1  # /think sometimes
    assert "thinking on, at most 6 tokens" in done.stderr
    assert "thinking off" in done.stderr and "thinking the template's default" in done.stderr
    assert "error: usage: /think on|off|TOKENS|default" in done.stderr
    chat = next(m["params"] for m in sent_messages(done.stdout) if m.get("method") == "chat")
    assert chat["thinking"] is True and chat["thinkingBudget"] == 6
    # Unraw, the reasoning is on stderr, each line marked, and never in the answer on stdout.
    reasoning = [line for line in done.stderr.splitlines() if line.startswith("[reasoning] ")]
    assert reasoning, done.stderr
    answer = done.stdout.splitlines()[-1]
    assert answer.strip() and "<think>" not in answer and "</think>" not in answer
    assert re.search(SUMMARY.replace(r"generated tokens", r"generated tokens · \d+ reasoning"), done.stderr)


def test_script_embed_shows_vectors_and_similarities(env, family_models):
    done = script(env, [f"/embed --model {family_models['embedding']} the sea | the ocean | mountains",
                        "/embed just one", "/embed", "/embed a |  | b"], "--no-load")
    assert done.returncode == 1  # the usage errors
    lines = done.stdout.splitlines()
    for i, text in enumerate(["the sea", "the ocean", "mountains", "just one"]):
        assert any(re.match(rf'\[{1 if i == 3 else i + 1}\] "{text}": 64 dimensions · norm 1\.0000 · \[-?0\.\d{{4}}, ', line)
                   for line in lines), (text, done.stdout)
    pairs = [line for line in lines if line.startswith("cos(")]
    assert [p.split()[0] for p in pairs] == ["cos(1,2)", "cos(1,3)", "cos(2,3)"]
    assert all(-1 <= float(p.split()[1]) <= 1 for p in pairs)
    assert done.stderr.count("error: usage: /embed") == 2
    assert re.search(rf"{family_models['embedding']} · \d+ tokens · [\d.]+ ms", done.stderr)


def test_help_lists_the_new_commands(env):
    done = script(env, ["/help", "/help think"], "--no-load")
    assert done.returncode == 0, done.stderr
    for usage in ("/tools [FILE|JSON|off]", "/json [SCHEMA|FILE|off]", "/think on|off|TOKENS", "/embed TEXT [| TEXT…]"):
        assert usage in done.stdout
    assert re.search(r"^/think on\|off\|TOKENS\s+reasoning models", done.stdout, re.M)


def test_tool_calls_reasoning_and_embeddings_formatting():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    assert fmt.tool_call_line(call) == 'tool call f {"a":1} (call_1)'
    assert fmt.tool_call_line({**call, "error": "unknown tool"}) == 'tool call f {"a":1} (call_1): invalid: unknown tool'
    result = {"finishReason": "tool_calls", "usage": {"promptTokens": 5, "completionTokens": 7, "reasoningTokens": 3},
              "timings": {"ttftMs": 1, "tokensPerSecond": 2, "maskMsPerToken": 0.25}, "toolCalls": [call]}
    assert fmt.generation_summary(result) == ("[tool_calls] 5 prompt + 7 generated tokens · 3 reasoning · 1 tool call"
                                              " · TTFT 1.0 ms · 2.0 tokens/s · mask 0.25 ms/token")
    lines = fmt.embedding_lines(["a", "b\nc"], {"vectors": [[1.0, 0.0], [0.6, 0.8]]}, shown=1)
    assert lines == ['[1] "a": 2 dimensions · norm 1.0000 · [1.0000, …]',
                     '[2] "b c": 2 dimensions · norm 1.0000 · [0.6000, …]',
                     'cos(1,2) 0.6000  "a" ~ "b c"']


def test_channels_and_plain_output_keep_reasoning_apart():
    import io

    from sidecar.client import Channels
    from sidecar.repl.output import PlainOutput

    channels = Channels()
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for chunk in ({"reasoning": "hm"}, {"reasoning": "m", "text": "Hi"}, {"toolCalls": [call]}, {"text": "!"}):
        channels.add(chunk)
    whole = channels.result({"finishReason": "tool_calls"})
    assert whole == {"finishReason": "tool_calls", "text": "Hi!", "reasoning": "hmm",
                     "toolCalls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert Channels().result({"finishReason": "stop"}) == {"finishReason": "stop", "text": ""}

    out, err = io.StringIO(), io.StringIO()
    output = PlainOutput(out, err)
    output.reasoning("first\nsec")
    output.reasoning("ond")
    output.text("The answer")
    output.end_text()
    assert err.getvalue() == "[reasoning] first\n[reasoning] second\n"
    assert out.getvalue() == "The answer\n"


def test_chat_only_settings_stay_out_of_generate():
    state = ReplState()
    state.settings.update({"tools": [WEATHER_TOOL], "thinking": True, "responseFormat": {"type": "json_object"},
                           "maxTokens": 5})
    assert set(state.generation_params("generate")) == {"model", "responseFormat", "maxTokens"}
    assert set(state.chat_params("hi", keep_history=False)) == {"model", "tools", "thinking", "responseFormat",
                                                               "maxTokens", "messages"}
    state.conversation.add("hi", "", [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    assert state.conversation.turns[1] == {"role": "assistant", "content": None, "toolCalls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert parse_setting("toolChoice", "required") == "required"
    assert parse_setting("tools", json.dumps([WEATHER_TOOL])) == [WEATHER_TOOL]


# ---- /finetune -------------------------------------------------------------------------------

LEARNER_PROMPT = rf"{LEARNER}(?: \[\d+\]| oneshot)?(?: raw)?>"


def learner_env(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    models = tmp_path / "models"
    build_learner(models)
    write_fact_dataset(models / "facts")  # under the models dir: the REPL's sidecar may read it
    return {**env, "LOCALMLX_MODELS_DIR": str(models)}, models


def test_script_finetune_trains_lists_and_loads_the_adapter(env, tmp_path):
    env, models = learner_env(env, tmp_path)
    done = script(env, [f"/finetune {models / 'facts'} iterations=10 lr=1e-3 name=fact stepsPerEval=5",
                        "/models", f"/load {LEARNER}+fact", "/generate The secret code",
                        f"/finetune {models / 'facts'} bogus=1"], "--model", LEARNER, "--no-load")
    assert done.returncode == 1  # the last line failed
    assert re.search(r"^  iteration 10/10: loss [\d.]+ · val [\d.]+ · \d+ tok/s · ETA", done.stderr, re.M)
    assert re.search(rf"^adapter fact: LoRA rank 8 on \d+ layers of {LEARNER}, 10 iterations in", done.stdout, re.M)
    assert f"/load {LEARNER}+fact chats with it" in done.stderr
    assert re.search(rf"^fact\s+{LEARNER}\s+lora\s+8\s+[\d.]+ KiB\s+10 its on facts, val loss [\d.]+$",
                     done.stdout, re.M)  # /models shows the adapter
    assert re.search(rf"loaded {LEARNER}\+fact: llama", done.stderr)  # the server resolves <base>+<adapter>
    assert re.search(SUMMARY, done.stderr)
    assert re.search(r"^line 5: error: /finetune takes no 'bogus'", done.stderr, re.M)


def test_ctrl_c_cancels_the_training_run_and_the_session_goes_on(terminal, env, tmp_path):
    env, models = learner_env(env, tmp_path)
    term = terminal("--model", LEARNER, "--no-load", LOCALMLX_MODELS_DIR=env["LOCALMLX_MODELS_DIR"])
    term.expect(LEARNER_PROMPT)
    term.type(f"/finetune {models / 'facts'} iterations=100000 stepsPerEval=1 name=long")
    # The status line: phase, iteration/total, losses, tokens/s, ETA.
    term.expect(r"train\s.*?\d+/100000.*?loss [\d.]+ · val [\d.]+ · \d+ tok/s · ETA")
    term.child.sendintr()
    term.expect(r"\^C: cancelling request \d+ \(\$/cancelRequest\)")
    term.expect(rf"error {REQUEST_CANCELLED}")
    term.expect(LEARNER_PROMPT)
    term.type("/status")
    term.expect(r"requests: 0 active, 0 queued")  # the same sidecar, idle
    term.expect(LEARNER_PROMPT)
    assert not (models / "adapters" / "long").exists()


def test_finetune_arguments_and_training_progress_words(tmp_path):
    from sidecar.repl.commands import finetune_params

    params = finetune_params(f"'{tmp_path}/my notes' lr=1e-3 layers=-1 iters=20 dora name=n1 max_seq_length=512 "
                             "keep-checkpoint=true model=other", "demo")
    assert params == {"model": "other", "dataset": f"{tmp_path}/my notes", "learningRate": 1e-3, "numLayers": -1,
                      "iterations": 20, "fineTuneType": "dora", "name": "n1", "maxSeqLength": 512,
                      "keepCheckpoint": True}
    assert finetune_params("data.jsonl", "demo")["model"] == "demo"
    assert finetune_params("data.jsonl", "demo")["dataset"] == str(Path.cwd() / "data.jsonl")
    for bad in ("", "a b", "a frob=1"):
        with pytest.raises(ValueError):
            finetune_params(bad, "demo")
    assert fmt.training_progress({"unit": "iteration", "trainLoss": 1.23456, "valLoss": 2.0,
                                  "tokensPerSecond": 812.4, "etaSeconds": 75}) == \
        "loss 1.235 · val 2.000 · 812 tok/s · ETA 1:15"
    assert fmt.training_progress({"unit": "phase", "phase": "load"}) == ""
    assert fmt.duration(4.24) == "4.2 s" and fmt.duration(3725) == "1:02:05"
    assert fmt.trained_by(None) == "made elsewhere"


# ---- profiles: /profile ----------------------------------------------------------------------


def test_script_profile_save_use_then_generate_through_it(env, tmp_path):
    profiles = tmp_path / "profiles"
    done = script({**env, "LOCALMLX_PROFILES_DIR": str(profiles)}, [
        '/profile save terse maxTokens=3 system="Be brief." tasks=chat,code', "/profile", "/profile terse",
        "/profile use terse", "/generate The sea", "hello", "/profile save bad bogus=1", "/profile rm terse",
        "/profile terse"], "--json")
    assert done.returncode == 1, done.stderr  # the last line failed
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["ok"] for r in records] == [True, True, True, True, True, True, False, True, False]
    saved = records[0]["result"]
    assert saved["model"] == "demo" and saved["system"] == "Be brief." and saved["path"] == str(profiles / "terse.toml")
    assert [p["name"] for p in records[1]["result"]["profiles"]] == ["terse"]
    assert re.search(r"^terse\s+demo\s+chat,code\s+maxTokens=3\s+system$", done.stdout + done.stderr, re.M)
    assert "max_tokens = 3" in done.stderr and 'system = "Be brief."' in done.stderr  # /profile terse: its TOML
    assert "chatting through profile terse" in done.stderr
    for generated in records[4:6]:  # generate, then a chat turn: the profile's maxTokens, its name in the result
        assert generated["result"]["profile"] == "terse" and generated["result"]["usage"]["completionTokens"] == 3
    assert "a profile has no 'bogus'" in records[6]["error"]["message"]
    assert "deleted profile terse" in done.stderr and not (profiles / "terse.toml").exists()
    assert records[8]["error"]["code"] == MODEL_NOT_FOUND


def test_profile_names_complete():
    state = ReplState(model_names=["demo"], profile_names=["terse", "tiny-coder"])
    assert matching(*candidates("/profile t", state)) == ["terse", "tiny-coder"]
    assert matching(*candidates("/profile ", state)) == ["rm", "save", "terse", "tiny-coder", "use"]
    assert matching(*candidates("/profile use ti", state)) == ["tiny-coder"]
    assert matching(*candidates("/profile rm te", state)) == ["terse"]
    assert matching(*candidates("/load t", state)) == ["terse", "tiny-coder"]  # a profile works as a model
    assert candidates("/profile save terse temp", state) == ("", [])
