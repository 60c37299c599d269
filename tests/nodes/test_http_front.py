"""The OpenAI-compatible HTTP front: request validation, chat template and stop strings (pure), then
`coel serve-local --http` driven by the official `openai` client: a completion and a streamed
chat completion, greedy tokens equal `coel generate`'s, /health, /v1/models, /metrics (parsed
with prometheus_client, token counters rising by the tokens served), each malformed request
answered with a 4xx OpenAI error body while the server keeps serving, and a closed connection
cancelling its request."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-moe"


# ---- pure ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_parse_request_accepts_openai_bodies_and_names_what_is_wrong():
    from nodes.openai_api import ApiError, parse_request
    r = parse_request("completion", {"model": "m", "prompt": "def ", "max_tokens": 4, "temperature": 0,
                                     "top_k": 5, "seed": 3, "stop": "\n", "stream": True,
                                     "stream_options": {"include_usage": True}, "user": "x"}, ("m",))
    assert (r.prompt_text, r.max_tokens, r.temperature, r.top_k, r.seed, r.stop, r.stream, r.include_usage) == \
        ("def ", 4, 0.0, 5, 3, ("\n",), True, True)
    assert parse_request("completion", {"model": "m", "prompt": [[1, 2, 3]]}, ("m",)).prompt_ids == (1, 2, 3)
    assert parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                  "max_completion_tokens": 7}, ("m",)).max_tokens == 7
    cases = [({"model": "other", "prompt": "x"}, 404, "model_not_found"),
             ({"prompt": "x"}, 400, "missing_field"),
             ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
             ({"model": "m", "prompt": "x", "max_tokens": "8"}, 400, "invalid_type"),
             ({"model": "m", "prompt": "x", "temperature": "hot"}, 400, "invalid_type"),
             ({"model": "m", "prompt": "x", "top_p": 0}, 400, "invalid_value"),
             ({"model": "m", "prompt": "x", "n": 2}, 400, "invalid_value"),
             ({"model": "m", "prompt": ["a", "b"]}, 400, "invalid_value"),
             ({"model": "m", "prompt": 5}, 400, "invalid_type"),
             ({"model": "m", "prompt": "x", "stop": ["a", 1]}, 400, "invalid_type")]
    for doc, status, code in cases:
        with pytest.raises(ApiError) as ei:
            parse_request("completion", doc, ("m",))
        assert (ei.value.status, ei.value.code) == (status, code), doc
        assert ei.value.body()["error"]["message"]
    with pytest.raises(ApiError, match="role must be one of"):
        parse_request("chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, ("m",))


@pytest.mark.unit
def test_chat_template_and_context_budget():
    from nodes.openai_api import ApiError, generation_budget, parse_request, render_chat
    text = render_chat([{"role": "system", "content": "be short"},
                        {"role": "user", "content": "parse a URL\nreturn the host"},
                        {"role": "assistant", "content": "def host(u):"},
                        {"role": "user", "content": [{"type": "text", "text": "now the port"}]}])
    assert text == "# system: be short\n# user: parse a URL\n# return the host\ndef host(u):\n# user: now the port\n"
    r = parse_request("completion", {"model": "m", "prompt": "x", "max_tokens": 10}, ("m",))
    assert generation_budget(r, 1000, 1024) == 10
    with pytest.raises(ApiError, match="maximum context length is 1024") as ei:
        generation_budget(r, 1020, 1024)
    assert ei.value.code == "context_length_exceeded"
    r = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, ("m",))
    assert generation_budget(r, 1000, 1024) == 24  # no max_tokens: what the context leaves


@pytest.mark.unit
def test_text_stream_holds_back_stop_prefixes_and_split_characters():
    from nodes.openai_api import TextStream
    vocab = {1: "ab", 2: "c\n", 3: "\nd", 4: "ef", 5: "\n", 6: "x"}
    dec = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    ts = TextStream(dec, eos_id=0, stop=("\n\n",))
    out = [ts.push(t) for t in (1, 2, 3)]
    assert out == ["ab", "c", ""] and ts.stopped and ts.finish_reason == "stop" and ts.text == "abc"
    ts = TextStream(dec, eos_id=0, stop=("\n\n",))
    assert [ts.push(t) for t in (1, 5, 6)] == ["ab", "", "\nx"] and not ts.stopped
    ts = TextStream(dec, eos_id=0)
    assert ts.push(4) == "ef" and ts.push(0) == "" and ts.stopped
    # byte-level BPE: a character split over two tokens comes out whole
    from coel_model.tokenizer import Tokenizer
    tok = Tokenizer.load(MODEL)
    ids = tok.encode("naïve → ok")
    ts = TextStream(tok.decode, eos_id=tok.eos_id)
    assert "".join(ts.push(i) for i in ids) + ts.flush() == "naïve → ok"


# ---- serve-local --http -----------------------------------------------------------------------
def _free_port() -> int:
    from nodes.local import free_port
    return free_port()


def _get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def _metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    status, text = _get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "coel", "serve-local", "--agents", "3", "--model",
                             str(MODEL), "--http", f"127.0.0.1:{port}"], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its agents share the group: never orphaned
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve-local --http did not become healthy in 90 s"
            time.sleep(0.2)
        yield port
    finally:
        # SIGTERM, not SIGINT: a shell that starts pytest in the background makes its children ignore SIGINT
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError("serve-local --http did not stop within 30 s of SIGTERM") from None
        assert rc == 0, proc.stdout.read()


def _client(port: int):
    import openai
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.integration
def test_openai_client_completion_and_streamed_chat_greedy_equals_generate(server):
    from coel_model.checkpoint import load_model
    from coel_model.generate import generate
    from coel_model.tokenizer import Tokenizer
    client = _client(server)
    before = _metrics(server)
    r = client.completions.create(model="tiny-moe", prompt="def ", max_tokens=16, temperature=0,
                                  extra_body={"return_token_ids": True})
    tok = Tokenizer.load(MODEL)
    want = generate(load_model(str(MODEL)), tok.encode("def "), 16)  # what `coel generate` runs
    got = r.choices[0].model_extra["token_ids"]
    assert got == want and r.choices[0].text == tok.decode([t for t in want if t != tok.eos_id])
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(tok.encode("def "))
    assert r.choices[0].finish_reason == ("length" if tok.eos_id not in want else "stop")

    stream = client.chat.completions.create(model="tiny-moe", stream=True, max_tokens=12, temperature=0.8,
                                            top_p=0.9, seed=7, extra_body={"top_k": 40},
                                            messages=[{"role": "user", "content": "parse a URL"}],
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= 12 and text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    again = client.chat.completions.create(model="tiny-moe", max_tokens=12, temperature=0.8, top_p=0.9, seed=7,
                                           extra_body={"top_k": 40},
                                           messages=[{"role": "user", "content": "parse a URL"}])
    assert again.choices[0].message.content == text  # same seed, same sampled tokens
    after = _metrics(server)
    served = len(want) + usage.completion_tokens + again.usage.completion_tokens
    assert after['coel_generation_tokens_total{api=http}'] - before.get('coel_generation_tokens_total{api=http}', 0) \
        == served
    assert after['coel_requests_total{api=http,outcome=ok}'] - before.get(
        'coel_requests_total{api=http,outcome=ok}', 0) == 3


@pytest.mark.integration
def test_health_models_and_metrics_answer(server):
    status, body = _get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(server, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny-moe"]
    assert [m.id for m in _client(server).models.list()] == ["tiny-moe"]
    m = _metrics(server)
    assert m["coel_placement_version"] == 1 and m["coel_entry_healthy{server=serve-local}"] == 1
    peers = [k for k in m if k.startswith("coel_expert_calls_total{")]
    assert len(peers) == 3 or m.get("coel_generation_tokens_total{api=http}", 0) == 0
    assert "coel_redeployments_total" in m and "coel_step_retries_total" in m
    assert any(k.startswith("coel_time_to_first_token_seconds_bucket") for k in m) or \
        not m.get("coel_generation_tokens_total{api=http}")


@pytest.mark.integration
def test_malformed_requests_get_4xx_openai_errors_and_the_server_keeps_serving(server):
    long_prompt = list(range(1, 1020))
    cases = [(b"{not json", 400, "invalid_json"),
             (b"[1, 2]", 400, "invalid_json"),
             (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": "many"}).encode(), 400, "invalid_type"),
             (json.dumps({"model": "tiny-moe", "prompt": {"a": 1}}).encode(), 400, "invalid_type"),
             (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model_not_found"),
             (json.dumps({"model": "tiny-moe", "prompt": long_prompt, "max_tokens": 16}).encode(), 400,
              "context_length_exceeded"),
             (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": 0}).encode(), 400, "invalid_value"),
             (json.dumps({"model": "tiny-moe", "prompt": "x", "max_tokens": -3}).encode(), 400, "invalid_value"),
             (json.dumps({"model": "tiny-moe", "prompt": [5, 99999]}).encode(), 400, "invalid_value")]
    import threading
    streamed: dict = {}

    def long_stream() -> None:  # in flight while the bad requests arrive
        chunks = list(_client(server).completions.create(model="tiny-moe", prompt="def ", max_tokens=400,
                                                         temperature=0, stream=True,
                                                         extra_body={"ignore_eos": True}))
        streamed["tokens"] = sum(1 for c in chunks if c.choices and c.choices[0].finish_reason is None)
        streamed["finish"] = chunks[-1].choices[0].finish_reason
    th = threading.Thread(target=long_stream)
    th.start()
    for body, status, code in cases:
        got, doc = _post(server, "/v1/completions", body)
        assert got == status and doc["error"]["code"] == code and doc["error"]["type"] == "invalid_request_error" \
            and doc["error"]["message"], (body[:60], got, doc)
        got, doc = _post(server, "/v1/completions", json.dumps({"model": "tiny-moe", "prompt": "import ",
                                                                 "max_tokens": 2, "temperature": 0}).encode())
        assert got == 200 and doc["usage"]["completion_tokens"] == 2, doc
    got, doc = _post(server, "/v1/chat/completions", json.dumps({"model": "tiny-moe", "messages": "hi"}).encode())
    assert got == 400 and doc["error"]["param"] == "messages"
    assert _get(server, "/health")[0] == 200
    th.join(60)
    assert streamed == {"tokens": 400, "finish": "length"}, streamed


@pytest.mark.integration
def test_closing_the_connection_cancels_the_request_and_stop_strings_end_it(server):
    before = _metrics(server)
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps({"model": "tiny-moe", "prompt": "class ", "max_tokens": 900,
                                                           "temperature": 0.9, "seed": 1, "ignore_eos": True,
                                                           "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    assert r.read1(200).startswith(b"data: {")
    c.sock.shutdown(2)
    c.close()
    deadline = time.monotonic() + 20
    key = "coel_requests_total{api=http,outcome=cancelled}"
    while _metrics(server).get(key, 0) <= before.get(key, 0):
        assert time.monotonic() < deadline, "the closed stream's request was never cancelled"
        time.sleep(0.2)
    m = _metrics(server)
    made = m["coel_generation_tokens_total{api=http}"] - before.get("coel_generation_tokens_total{api=http}", 0)
    assert made < 900, made  # stopped well before max_tokens
    # a stop string ends the text before it, with finish_reason "stop", and the decode stops too
    full = _client(server).completions.create(model="tiny-moe", prompt="def ", max_tokens=40, temperature=0)
    cut = next((s for s in ("(", ":", "_", " ", "e") if full.choices[0].text.find(s) > 0), None)
    assert cut is not None, full.choices[0].text
    r = _client(server).completions.create(model="tiny-moe", prompt="def ", max_tokens=40, temperature=0, stop=[cut])
    assert r.choices[0].text == full.choices[0].text.split(cut)[0] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens


@pytest.mark.integration
def test_health_is_503_without_a_placement_and_while_requests_wait_for_a_new_one():
    import threading

    from coel_model.checkpoint import load_model
    from nodes.entry import EntryConfig, serve_in_thread
    from nodes.local import LocalCluster, deploy_experts, free_port, round_robin_placement
    model = load_model(str(MODEL))
    mc = model.cfg
    with LocalCluster(1, 64.0) as cluster:
        good = round_robin_placement(mc.n_layers, mc.n_experts, cluster.endpoints)
        deploy_experts(model, cluster, good, 16)
        port = free_port()
        svc, th = serve_in_thread(EntryConfig(name="h", listen=f"tcp://127.0.0.1:{free_port()}", model_dir=str(MODEL),
                                              http=f"127.0.0.1:{port}", call_timeout_s=0.3, layer_deadline_s=0.6,
                                              placement_wait_s=30))
        try:
            status, body = _get(port, "/health")
            assert status == 503 and "no expert placement" in json.loads(body)["reason"], body
            dead = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: every expert call fails
            svc.apply_placement({"version": 1, "holders": [[l, e, [dead]] for (l, e) in good]})
            answer: dict = {}
            req = threading.Thread(target=lambda: answer.update(r=_post(port, "/v1/completions", json.dumps(
                {"model": "tiny-moe", "prompt": "def ", "max_tokens": 4, "temperature": 0}).encode())))
            req.start()
            deadline = time.monotonic() + 15
            while True:
                status, body = _get(port, "/health")
                if status == 503 and "re-deployment in progress" in json.loads(body)["reason"]:
                    break
                assert time.monotonic() < deadline, (status, body)
                time.sleep(0.1)
            assert _metrics(port)["coel_requests_blocked"] == 1
            svc.apply_placement({"version": 2, "holders": [[l, e, eps] for (l, e), eps in good.items()]})
            req.join(30)
            status, doc = answer["r"]
            assert status == 200 and doc["usage"]["completion_tokens"] == 4, doc
            assert _get(port, "/health")[0] == 200
            m = _metrics(port)
            assert m["coel_step_retries_total"] >= 1 and m["coel_redeployments_total"] == 1
            assert m["coel_placement_version"] == 2 and m["coel_requests_blocked"] == 0
        finally:
            svc.stop()
            th.join(10)
