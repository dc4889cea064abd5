"""Profiles: a named model setup (template, system prompt, defaults, context, keep-alive) that
works wherever a model name does, and model "auto", which routes among them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import RpcCallError, SidecarClient
from sidecar.profiles.routing import Candidate, RoutingStats, choose, classify
from sidecar.profiles.store import Profile

from .conftest import Sidecars

PLAIN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
ASK = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    return tmp_path / "profiles"


@pytest.fixture
def client(sidecars: Sidecars, profiles_dir: Path) -> SidecarClient:
    return sidecars.spawn(LOCALMLX_PROFILES_DIR=str(profiles_dir))


def save(client: SidecarClient, name: str, **fields: Any) -> dict[str, Any]:
    return client.request("profiles/save", {"name": name, "profile": {"model": "demo", **fields}})


def chat(client: SidecarClient, model: str, messages: list[dict[str, str]] = ASK, **params: Any) -> dict[str, Any]:
    return client.request("chat", {"model": model, "messages": messages, "temperature": 0, "maxTokens": 12,
                                   "cache": False, **params})


def test_a_template_renders_the_prompt_exactly_as_written(client: SidecarClient, demo_model_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    save(client, "plain", template=PLAIN)
    through = chat(client, "plain")
    rendered = "[user] Tell me about the sea.\n[assistant] "
    raw = client.request("generate", {"model": "demo", "prompt": rendered, "temperature": 0, "maxTokens": 12, "cache": False})
    tokenizer = load_tokenizer(demo_model_path)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert through["usage"]["promptTokens"] == raw["usage"]["promptTokens"] == len(ids)
    assert through["text"] == raw["text"] and through["profile"] == "plain" and through["model"] == "demo"
    own = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    assert own != rendered and chat(client, "demo")["text"] != through["text"]  # not the model's own ChatML


def test_defaults_system_prompt_and_overrides(client: SidecarClient) -> None:
    saved = save(client, "terse", system="Answer in one word.", keepAlive="10m", contextLength=64,
                 defaults={"maxTokens": 3, "temperature": 0, "stop": ["zzz"]}, tasks=["chat"])
    assert saved["defaults"] == {"maxTokens": 3, "temperature": 0, "stop": ["zzz"]} and saved["keepAlive"] == "10m"
    plain = client.request("chat", {"model": "demo", "messages": ASK, "temperature": 0, "maxTokens": 20, "cache": False})
    terse = client.request("chat", {"model": "terse", "messages": ASK, "cache": False})
    assert terse["usage"]["completionTokens"] == 3  # the profile's maxTokens
    assert terse["usage"]["promptTokens"] > plain["usage"]["promptTokens"]  # its system prompt went first
    assert client.request("chat", {"model": "terse", "messages": ASK, "maxTokens": 5, "cache": False}
                          )["usage"]["completionTokens"] == 5  # the request's own wins
    own_system = [{"role": "system", "content": "Be kind."}, *ASK]
    mine = client.request("chat", {"model": "terse", "messages": own_system, "cache": False})
    theirs = client.request("chat", {"model": "demo", "messages": own_system, "maxTokens": 3, "temperature": 0,
                                     "cache": False})
    assert mine["usage"]["promptTokens"] == theirs["usage"]["promptTokens"]  # a chat with a system prompt keeps it
    with pytest.raises(RpcCallError) as too_long:  # its context length caps the prompt
        client.request("chat", {"model": "terse", "messages": [{"role": "user", "content": "sea " * 80}]})
    assert too_long.value.code == -32016 and too_long.value.data["contextLength"] == 64
    described = {m["model"]: m for m in client.request("server/status")["models"]}["demo"]
    assert described["keepAlive"] == 600  # the profile's keep-alive became its model's


def test_two_profiles_on_one_model_share_it(client: SidecarClient) -> None:
    save(client, "one", defaults={"temperature": 0})
    save(client, "two", template=PLAIN)
    ids = [client.start_request("chat", {"model": name, "messages": ASK, "maxTokens": 8, "cache": False})
           for name in ("one", "two", "one")]
    assert all("result" in client.wait_response(i) for i in ids)
    assert [m["model"] for m in client.request("server/status")["models"]] == ["demo"]
    assert client.request("models/load", {"model": "two"})["model"] == "demo"


def test_profiles_are_listed_read_and_deleted(client: SidecarClient, profiles_dir: Path) -> None:
    save(client, "kept", tasks=["code"], draftModel="demo-draft")
    got = client.request("profiles/get", {"name": "kept"})
    assert got["path"] == str(profiles_dir / "kept.toml") and got["tasks"] == ["code"] and got["draftModel"] == "demo-draft"
    assert 'model = "demo"' in (profiles_dir / "kept.toml").read_text()  # human-editable TOML
    assert [p["name"] for p in client.request("profiles/list")["profiles"]] == ["kept"]
    with pytest.raises(RpcCallError) as exists:
        client.request("profiles/save", {"name": "kept", "profile": {"model": "demo"}, "overwrite": False})
    assert exists.value.code == -32602
    assert client.request("profiles/delete", {"name": "kept"}) == {"name": "kept", "deleted": True}
    with pytest.raises(RpcCallError) as gone:
        client.request("profiles/get", {"name": "kept"})
    assert gone.value.code == -32010
    with pytest.raises(RpcCallError) as reserved:
        client.request("profiles/save", {"name": "auto", "profile": {"model": "demo"}})
    assert reserved.value.code == -32602


def test_a_malformed_profile_is_a_clear_error_and_never_stops_the_sidecar(
        client: SidecarClient, profiles_dir: Path) -> None:
    profiles_dir.mkdir(parents=True, exist_ok=True)
    (profiles_dir / "broken.toml").write_text('model = "demo"\ntemperature = \n')
    save(client, "fine")
    listed = client.request("profiles/list")
    assert [p["name"] for p in listed["profiles"]] == ["fine"]
    (error,) = listed["errors"]
    assert error["name"] == "broken" and "line 2" in error["message"]
    with pytest.raises(RpcCallError) as using:
        chat(client, "broken")
    assert using.value.code == -32602 and "broken.toml" in using.value.message
    with pytest.raises(RpcCallError) as bad_template:
        client.request("profiles/save", {"name": "jinja", "profile": {"model": "demo", "template": "{% for m in messages %}\n{{ m "}})
    assert bad_template.value.code == -32602 and bad_template.value.data["errors"][0].get("line") == 2
    assert client.request("ping") == {}
    assert chat(client, "fine")["profile"] == "fine"


def test_a_template_that_fails_to_render_says_where(client: SidecarClient) -> None:
    save(client, "raises", template="{% for m in messages %}\n{{ raise_exception('no ' + m['role'] + ' here') }}\n{% endfor %}")
    with pytest.raises(RpcCallError) as failed:
        chat(client, "raises")
    assert failed.value.code == -32602 and "no user here" in failed.value.message
    assert failed.value.data["templateLine"] == 2 and "profile's chat template" in failed.value.message


def test_a_model_without_a_chat_template_says_to_give_it_one(sidecars: Sidecars, models_dir: Path, tmp_path: Path) -> None:
    import shutil

    bare = models_dir / "demo-no-template"
    if not bare.exists():
        staging = tmp_path / "bare"
        shutil.copytree(models_dir / "localmlx-demo", staging)
        config = json.loads((staging / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (staging / "tokenizer_config.json").write_text(json.dumps(config))
        (staging / "chat_template.jinja").unlink(missing_ok=True)
        shutil.move(staging, bare)
    client = sidecars.spawn(LOCALMLX_PROFILES_DIR=str(tmp_path / "profiles"))
    with pytest.raises(RpcCallError) as refused:
        chat(client, "demo-no-template")
    assert refused.value.code == -32602 and "give it one in a profile" in refused.value.message
    client.request("profiles/save", {"name": "fixed", "profile": {"model": "demo-no-template", "template": PLAIN}})
    assert chat(client, "fixed")["usage"]["completionTokens"] > 0


# ---- routing ------------------------------------------------------------------------------

def profile(name: str, *tasks: str) -> Profile:
    return Profile(name, "demo", None, None, None, None, {}, None, None, None, tasks, Path(f"/p/{name}.toml"))


def test_requests_are_classified_cheaply() -> None:
    assert classify({"messages": ASK}) == "chat"
    assert classify({"messages": ASK, "tools": [{"type": "function"}]}) == "extraction"
    assert classify({"messages": ASK, "responseFormat": {"type": "json_object"}}) == "extraction"
    assert classify({"messages": [{"role": "user", "content": "Fix this:\n```py\nx = 1\n```"}]}) == "code"
    assert classify({"messages": [{"role": "user", "content": "word " * 2000}]}) == "summarize"
    assert classify({"messages": [{"role": "user", "content": "Think step by step: 17 * 23?"}]}) == "reasoning"
    assert classify({"prompt": "Once upon a time", "thinking": True}) == "reasoning"


def test_routing_is_deterministic_and_learns_from_measurements() -> None:
    fast, slow, coder = profile("fast", "chat"), profile("slow", "chat"), profile("coder", "code")
    everyone = [Candidate(p, loaded=True, fits=True) for p in (fast, slow, coder)]
    stats = RoutingStats(None)
    chosen, why = choose({"messages": ASK}, everyone, stats, now=1000.0)
    assert chosen is fast and why["task"] == "chat" and why["taskFrom"] == "classified"  # unmeasured: by name
    code, _ = choose({"messages": ASK, "task": "code"}, everyone, stats, now=1000.0)
    assert code is coder
    for i in range(5):  # measured: slow turns out faster
        stats.record("fast", 1000.0 + i, ok=True, tokens_per_second=20.0, ttft_s=0.5)
        stats.record("slow", 1000.0 + i, ok=True, tokens_per_second=60.0, ttft_s=0.2)
    chosen, why = choose({"messages": ASK}, everyone, stats, now=1010.0)
    assert chosen is slow and "measured" in why["reason"]
    assert choose({"messages": ASK}, everyone, stats, now=1010.0)[0] is slow  # the same inputs, the same choice
    for i in range(5):  # then it keeps failing: routing moves away
        stats.record("slow", 1020.0 + i, ok=False)
    assert choose({"messages": ASK}, everyone, stats, now=1030.0)[0] is fast
    too_big = [Candidate(fast, loaded=False, fits=False), Candidate(slow, loaded=False, fits=True)]
    chosen, why = choose({"messages": ASK}, too_big, RoutingStats(None), now=0.0)
    assert chosen is slow and {"profile": "fast", "score": None, "note": "does not fit the memory budget"} in why["candidates"]


def test_measurements_decay_and_retries_count_against_a_profile(tmp_path: Path) -> None:
    stats = RoutingStats(tmp_path / "routing.json", half_life=100.0)
    stats.record("a", 0.0, ok=True, tokens_per_second=10.0, ttft_s=0.1, conversation="c1")
    stats.record("b", 10.0, ok=True, tokens_per_second=10.0, ttft_s=0.1, conversation="c1")  # c1 again: a retry of a
    assert stats.current("a", 10.0).retries == pytest.approx(1.0)
    assert stats.current("a", 110.0).weight == pytest.approx(0.5 ** 1.1)  # one request, 110 s old
    stats.save()
    again = RoutingStats.load(tmp_path / "routing.json", half_life=100.0)
    assert again.current("a", 10.0).retries == pytest.approx(1.0)


def test_model_auto_routes_over_the_protocol_and_says_why(client: SidecarClient, profiles_dir: Path) -> None:
    save(client, "quick", tasks=["chat"], defaults={"maxTokens": 4})
    save(client, "careful", tasks=["chat", "reasoning"], defaults={"maxTokens": 6})
    (profiles_dir / "routing.json").write_text(json.dumps({"version": 1, "profiles": {
        "careful": {"weight": 5, "tokens_per_second": 500, "ttft_s": 0.5, "speed_weight": 5, "failures": 0,
                    "cancellations": 0, "retries": 0, "at": 0}}}))
    routed = client.request("chat", {"model": "auto", "messages": [{"role": "user", "content": "Why is the sea salty?"}],
                                     "cache": False})
    assert routed["profile"] == "careful" and routed["routedBy"]["task"] == "reasoning"
    assert routed["usage"]["completionTokens"] <= 6
    stated = client.request("chat", {"model": "auto", "task": "chat", "messages": ASK, "cache": False})
    assert stated["routedBy"]["taskFrom"] == "stated" and stated["profile"] in ("quick", "careful")
    assert {c["profile"] for c in stated["routedBy"]["candidates"]} == {"quick", "careful"}
    for name in ("quick", "careful"):
        client.request("profiles/delete", {"name": name})
    with pytest.raises(RpcCallError) as none:
        client.request("chat", {"model": "auto", "messages": ASK})
    assert none.value.code == -32602 and "routedBy" in none.value.data


@pytest.mark.parametrize(("server", "profile_default", "request_value", "expected"), [
    (4, None, None, 4), (4, 3, None, 3), (4, None, 2, 2), (4, 3, 2, 2), (None, 3, None, 3)])
def test_each_layer_overrides_the_one_below(sidecars: Sidecars, tmp_path: Path, server: int | None,
                                            profile_default: int | None, request_value: int | None, expected: int) -> None:
    """maxTokens: the server's setting < the profile's default < the request's own."""
    env = {"LOCALMLX_PROFILES_DIR": str(tmp_path / "profiles")}
    if server is not None:
        env["LOCALMLX_MAX_TOKENS"] = str(server)
    client = sidecars.spawn(**env)
    client.request("profiles/save", {"name": "layered", "profile": {
        "model": "demo", "defaults": {"temperature": 0, "stop": ["no such stop"],
                                      **({"maxTokens": profile_default} if profile_default else {})}}})
    params: dict[str, Any] = {"model": "layered", "messages": ASK, "cache": False}
    if request_value is not None:
        params["maxTokens"] = request_value
    assert client.request("chat", params)["usage"]["completionTokens"] == expected
