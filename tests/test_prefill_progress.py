"""A long prompt reports its processing: `$/progress` phase "prefill" for a chat or generate
that carries a progressToken, on the solo path and in a batch, always before the response."""

from __future__ import annotations

from typing import Any

from sidecar.client import SidecarClient

LONG = " ".join(f"word{i % 97} and the sea" for i in range(200))


def prefill_reports(client: SidecarClient, token: str) -> list[dict[str, Any]]:
    return [r.message["params"] for r in list(client.received)
            if r.message.get("method") == "$/progress" and r.message["params"]["token"] == token
            and r.message["params"]["phase"] == "prefill"]


def index_of_response(client: SidecarClient, id_: Any) -> int:
    return next(i for i, r in enumerate(list(client.received)) if r.message.get("id") == id_ and "method" not in r.message)


def check(client: SidecarClient, token: str, id_: Any, response: dict[str, Any]) -> None:
    reports = prefill_reports(client, token)
    computed = response["result"]["usage"]["promptTokens"] - response["result"]["usage"]["cachedTokens"]
    assert len(reports) >= 2, reports
    assert all(r["unit"] == "tokens" and r["total"] == computed for r in reports), (computed, reports)
    done = [r["completed"] for r in reports]
    assert done == sorted(done) and done[-1] == computed
    last = max(i for i, r in enumerate(list(client.received)) if r.message.get("method") == "$/progress"
               and r.message["params"]["token"] == token)
    assert last < index_of_response(client, id_)


def test_a_long_prompt_reports_prefill_progress_alone_and_in_a_batch(sidecars) -> None:
    # a report per chunk at most every PROGRESS_INTERVAL_S: small chunks, a prompt of many
    client = sidecars.spawn(LOCALMLX_PREFILL_STEP_SIZE="16", LOCALMLX_PREFIX_CACHE="false")
    params = {"model": "demo", "prompt": LONG, "maxTokens": 2, "temperature": 0,
              "_meta": {"progressToken": "alone"}}
    id_ = client.start_request("generate", params)
    check(client, "alone", id_, client.wait_response(id_))
    ids = [client.start_request("generate", dict(params, prompt=LONG + f" {n}", _meta={"progressToken": f"b{n}"}))
           for n in range(2)]
    for n, id_ in enumerate(ids):
        check(client, f"b{n}", id_, client.wait_response(id_))
    quiet = client.request("generate", {"model": "demo", "prompt": LONG, "maxTokens": 2})
    assert quiet["finishReason"] == "length"
    assert client.close() == 0
