"""`islands serve` for real: a server subprocess on a free port of 127.0.0.1 (its own local
Ray and Serve), a real HTTP client, tiny trained runs (tests/conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from orchestrator.cli.main import app
from tests.serve_servers import Server, start_server, stop_server

runner = CliRunner()
IMAGES = "/v1/images/generations"
COMPLETIONS = "/v1/completions"


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching `labels` (0 when none yet)."""
    _, _, body = server.get("/metrics")
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def rows_per_call(server: Server) -> tuple[float, float]:
    return (metric(server, "islands_serve_expert_call_rows_sum"),
            metric(server, "islands_serve_expert_call_rows_count"))


def pixels(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


# -- images, experts inside the ingress ---------------------------------------------------

def test_models_lists_the_ensemble_and_its_experts(image_server):
    status, _, body = image_server.get("/v1/models")
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list"
    ensemble, *experts = listing["data"]
    assert ensemble["id"] == "tiny-digits" and ensemble["modality"] == "image"
    assert [e["id"] for e in experts] == ["tiny-digits/expert-0", "tiny-digits/expert-1"]
    assert all(e["parent"] == "tiny-digits" and e["up"] and e["island"] for e in experts)
    assert image_server.get("/healthz")[0] == 200


def test_the_same_seed_gives_the_bytes_islands_sample_writes(image_server, tmp_path):
    body = {"n": 3, "seed": 5, "steps": 4, "routing": {"strategy": "topk", "k": 2},
            "grid": True}
    status, headers, answer = image_server.post(IMAGES, body)
    assert status == 200, answer
    assert "x-islands-degraded" not in headers and answer["degraded"] == []
    images = [pixels(item["b64_json"]) for item in answer["data"]]
    assert len(images) == 3 and all(im.format == "PNG" and im.size == (8, 8) for im in images)
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(image_server.run_dir), "--n", "3", "--seed",
                                 "5", "--steps", "4", "--strategy", "topk", "--top-k", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert base64.b64decode(answer["grid_b64"]) == out.read_bytes()
    again = image_server.post(IMAGES, body)[2]
    assert [i["b64_json"] for i in again["data"]] == [i["b64_json"] for i in answer["data"]]
    other = image_server.post(IMAGES, {**body, "seed": 6})[2]
    assert [i["b64_json"] for i in other["data"]] != [i["b64_json"] for i in answer["data"]]


@pytest.mark.parametrize(("strategy", "per_step"), [("top1", 1), ("topk", 2), ("full", 2)])
def test_each_routing_mode_runs_the_experts_it_names(image_server, strategy, per_step):
    status, _, answer = image_server.post(IMAGES, {"n": 2, "steps": 3, "routing": {
        "strategy": strategy, "k": 2}})
    assert status == 200, answer
    for item in answer["data"]:
        trace = item["routing"]
        assert len(trace["experts"]) == 3  # one entry per step
        assert all(len(used) == per_step for used in trace["experts"])
        assert all(abs(sum(row) - 1) < 1e-3 for row in trace["weights"])
    assert answer["expert_calls_per_image"] == 3 * per_step


def test_bad_bodies_are_422_naming_the_field(image_server):
    cases = [({"n": 0}, "n"), ({"stepz": 3}, "stepz"),
             ({"routing": {"strategy": "best"}}, "routing.strategy"),
             ({"routing": {"strategy": "topk", "k": 3}}, "routing.k"),
             ({"model": "elsewhere"}, "model"), ({"timeout": -1}, "timeout")]
    for body, field in cases:
        status, _, answer = image_server.post(IMAGES, body)
        assert status == 422, (body, answer)
        assert answer["error"]["param"] == field, answer
        assert answer["error"]["message"].startswith(field), answer
    status, _, answer = image_server.post(IMAGES, b"{not json")
    assert status == 422 and answer["error"]["type"] == "invalid_request_error"
    status, _, answer = image_server.post(COMPLETIONS, {"prompt": "x"})
    assert status == 404 and "/v1/images/generations" in answer["error"]["message"]


def test_concurrent_requests_all_succeed_sharing_expert_calls(image_server):
    rows, calls = rows_per_call(image_server)
    bodies = [{"n": 2, "seed": seed, "steps": 40} for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: image_server.post(IMAGES, body), bodies))
    assert [status for status, _, _ in answers] == [200] * 8
    rows_after, calls_after = rows_per_call(image_server)
    # One request alone puts at most its 2 rows in an expert call; stepped together, the
    # requests' rows share each expert's call.
    assert (rows_after - rows) / (calls_after - calls) > 2
    assert rows_after - rows == 8 * 2 * 40  # top1: each image one expert row per step


def test_deterministic_requests_give_the_same_bytes_whatever_runs_beside_them(image_server):
    body = {"n": 3, "seed": 11, "steps": 30, "deterministic": True}
    alone = image_server.post(IMAGES, body)[2]["data"]
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(image_server.post, IMAGES, {"n": 4, "seed": s, "steps": 30})
                  for s in range(5)]
        beside = pool.submit(image_server.post, IMAGES, body).result()
        assert all(f.result()[0] == 200 for f in others)
    assert beside[0] == 200
    assert [i["b64_json"] for i in beside[2]["data"]] == [i["b64_json"] for i in alone]
    # Run alone, a request takes the shapes a deterministic one has: the same bytes.
    plain = image_server.post(IMAGES, {**body, "deterministic": False})[2]["data"]
    assert [i["b64_json"] for i in plain] == [i["b64_json"] for i in alone]


def test_a_full_queue_is_answered_429_with_retry_after(image_server):
    # 8 in flight and 4 waiting at most (tests/conftest.py SERVER_LIMITS).
    bodies = [{"n": 1, "seed": seed, "steps": 400} for seed in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda body: image_server.post(IMAGES, body), bodies))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 12
    for status, headers, answer in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert answer["error"]["type"] == "rate_limit_exceeded"


def test_a_missed_deadline_is_504(image_server):
    status, _, answer = image_server.post(IMAGES, {"n": 4, "steps": 1000, "timeout": 0.2})
    assert status == 504, answer
    assert answer["error"]["type"] == "timeout"
    assert image_server.post(IMAGES, {"n": 1, "steps": 2})[0] == 200  # the server goes on


def test_a_client_that_disconnects_frees_its_slot(image_server):
    gone = metric(image_server, "islands_serve_requests_total", status="499")
    host, port = image_server.url.removeprefix("http://").split(":")
    payload = json.dumps({"n": 64, "steps": 1000}).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: "
                       + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 30
        while metric(image_server, "islands_serve_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while (metric(image_server, "islands_serve_inflight_requests") > 0
           or metric(image_server, "islands_serve_requests_total", status="499") == gone):
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.1)


def test_metrics_are_prometheus_text_with_every_series(image_server):
    image_server.post(IMAGES, {"n": 1, "steps": 2})
    _, headers, body = image_server.get("/metrics")
    assert headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"islands_serve_queue_depth", "islands_serve_expert_call_rows",
            "islands_serve_step_seconds", "islands_serve_router_seconds",
            "islands_serve_requests"} <= names
    assert metric(image_server, "islands_serve_router_seconds_count") > 0


# -- text ---------------------------------------------------------------------------------

def sse(server: Server, body: dict) -> list[str]:
    """The `data:` payloads of a streamed completion, in order."""
    import urllib.request

    request = urllib.request.Request(server.url + COMPLETIONS, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        text = answer.read().decode()
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block]


def test_a_completion_is_what_islands_generate_writes_and_streams_the_same(text_server):
    body = {"prompt": "The ", "max_tokens": 16, "temperature": 0.8, "seed": 3}
    status, _, answer = text_server.post(COMPLETIONS, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion" and choice["finish_reason"] in ("stop",
                                                                                 "length")
    assert answer["usage"]["prompt_tokens"] == 4
    result = runner.invoke(app, ["generate", str(text_server.run_dir), "--prompt", "The ",
                                 "--max-new-tokens", "16", "--temperature", "0.8",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    printed = result.output.split("\n", 1)[1]  # after the routing line
    assert printed.rstrip("\n") == ("The " + choice["text"]).rstrip("\n")
    events = sse(text_server, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert len(chunks) > 2  # streamed as it was decoded, not in one piece


def test_text_requests_stepped_together_each_get_their_own_continuation(text_server):
    bodies = [{"prompt": prompt, "max_tokens": 12, "seed": seed, "temperature": 1.0}
              for seed, prompt in enumerate(["The ", "A man ", "Why ", "If you "])]
    alone = [text_server.post(COMPLETIONS, {**b, "deterministic": True})[2] for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: text_server.post(COMPLETIONS, {
            **b, "deterministic": True}), bodies))
    assert [a["choices"][0]["text"] for a in alone] == \
        [t[2]["choices"][0]["text"] for t in together]


def test_a_prompt_longer_than_the_context_is_422_naming_prompt(text_server):
    status, _, answer = text_server.post(COMPLETIONS, {"prompt": "x" * 500})
    assert status == 422 and answer["error"]["param"] == "prompt"
    assert "context" in answer["error"]["message"]
    status, _, answer = text_server.post(COMPLETIONS, {"prompt": ""})
    assert status == 422 and answer["error"]["param"] == "prompt"


def test_streamed_text_is_cut_only_on_character_boundaries():
    """Bytes of one character arriving over several steps come out together."""
    from types import SimpleNamespace

    from orchestrator.modalities.text.serving import TextLane

    lane = TextLane.__new__(TextLane)
    lane.sent = {}
    euro = list("€".encode())  # 3 bytes
    item = SimpleNamespace(new=[], finished=False)
    import codecs

    lane.sent[id(item)] = (0, codecs.getincrementaldecoder("utf-8")("replace"))
    out = []
    for token in [*b"ab", *euro, *b"c", 0xFF, *euro[:2]]:
        item.new.append(token)
        out.append(lane.fresh(item))
    item.finished = True
    out.append(lane.fresh(item))
    assert out[:6] == ["a", "b", "", "", "€", "c"]
    assert "".join(out) == bytes(item.new).decode("utf-8", errors="replace")


# -- experts on their own deployments -------------------------------------------------

@pytest.fixture(scope="module")
def deployed(serving_runs, tmp_path_factory) -> Iterator[tuple[Server, list[str]]]:
    """The image run with one Serve deployment per expert; what /readyz said while the
    experts started."""
    log = tmp_path_factory.mktemp("serve-deployed") / "server.log"
    server = start_server(serving_runs["image"], log, "--layout", "deployments",
                          "--expert-cpus", "0.5", wait=False)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.process.poll() is None, server.output()[-3000:]
            assert time.monotonic() < deadline, server.output()[-3000:]
            try:
                status, _, body = server.get("/readyz", timeout=5)
            except OSError:
                status, body = 0, b"{}"
            try:
                reason = json.loads(body).get("reason")
            except ValueError:  # the proxy's own answer before the route exists
                reason = body[:40].decode(errors="replace")
            said = "ready" if status == 200 else f"{status}:{reason}"
            if not seen or seen[-1] != said:
                seen.append(said)
            if status == 200:
                break
            time.sleep(0.05)
        yield server, seen
    finally:
        stop_server(server)


def test_readiness_goes_from_not_ready_to_ready(deployed):
    server, seen = deployed
    assert seen[-1] == "ready"
    waiting = [said for said in seen if said.startswith("503:")]
    assert waiting, seen  # the ingress answered before its experts did
    assert any("experts" in said for said in waiting), seen
    listing = json.loads(server.get("/v1/models")[2])
    assert listing["data"][0]["layout"] == "deployments"


def test_deployed_experts_give_the_bytes_of_the_experts_in_process(deployed, image_server):
    server, _ = deployed
    body = {"n": 2, "seed": 4, "steps": 5, "routing": {"strategy": "full"}}
    here = image_server.post(IMAGES, body)[2]["data"]
    there = server.post(IMAGES, body)[2]["data"]
    assert [i["b64_json"] for i in there] == [i["b64_json"] for i in here]


def test_an_expert_replica_killed_mid_load_fails_no_request(deployed):
    import os
    import signal

    import psutil

    server, _ = deployed
    answers: list[tuple[int, dict, dict]] = []

    def load() -> None:
        bodies = [{"n": 2, "seed": s, "steps": 200, "routing": {"strategy": "full"}}
                  for s in range(24)]
        with ThreadPoolExecutor(6) as pool:
            answers.extend(pool.map(lambda body: server.post(IMAGES, body), bodies))

    # Found before the load starts, so the kill lands while requests are in flight.
    replica = [p for p in psutil.process_iter(["cmdline"])
               if "ServeReplica:islands-expert-1:" in " ".join(p.info["cmdline"] or [])]
    assert len(replica) == 1
    clients = threading.Thread(target=load)
    clients.start()
    deadline = time.monotonic() + 60
    while metric(server, "islands_serve_inflight_requests") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(replica[0].pid, signal.SIGKILL)
    degraded = None
    while degraded is None and time.monotonic() < deadline:
        state = server.ready()
        if state and state["degraded"]:
            degraded = state
        time.sleep(0.05)
    clients.join(120)
    assert degraded is not None and degraded["down"] == ["expert-1"] and degraded["up"] == 1
    assert [status for status, _, _ in answers] == [200] * 24
    marked = [a for _, h, a in answers if h.get("x-islands-degraded") == "expert-1"]
    assert marked and all(a["degraded"] == ["expert-1"] for a in marked)
    deadline = time.monotonic() + 120
    while (server.ready() or {}).get("degraded", True):  # the replica is started again
        assert time.monotonic() < deadline, "the expert did not rejoin"
        time.sleep(0.5)
    assert server.post(IMAGES, {"n": 1, "steps": 2, "routing": {"strategy": "full"}})[0] == 200


# -- the command line ---------------------------------------------------------------------

def test_serve_refuses_bad_input_in_one_line(serving_runs, tmp_path):
    result = runner.invoke(app, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not an islands run" in result.output
    result = runner.invoke(app, ["serve", str(serving_runs["image"]), "--layout", "cloud"])
    assert result.exit_code == 2 and "--layout" in result.output
    assert "Traceback" not in result.output


def test_serve_refuses_a_run_whose_router_is_not_trained(serving_runs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(serving_runs["image"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["router"]["state"] = "pending"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["serve", str(copy)])
    assert result.exit_code == 2, result.output
    assert "router stage is not done" in result.output


