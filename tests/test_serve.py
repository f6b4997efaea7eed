"""serve_app: the continuous-batching scheduler (no Ray), the HTTP layer against a fake engine (no Ray), then
one real deployment on the session's Ray cluster, shared by the module: the OpenAI client, batching,
limits, cancellation, the Gradio page in headless Chromium, a replica killed, checkpoint roll-outs."""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from conftest import assert_dashboard_finds, metric_values, scrape_metrics, wait_for_metrics
from nanochat.checkpoint import build_model, checkpoint_dir
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from serve_app.random_model import save_random_checkpoint
from serve_app.scheduler import RequestTimeout, Scheduler

SEQ_LEN = 512
CHROMIUM = "/usr/bin/chromium"


def tiny_config(tok):
    return GPTConfig(sequence_len=SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def greedy_text(model, tok, messages, max_tokens):
    """What the Engine answers, greedily, to a chat: (text, completion token count)."""
    prompt = tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    tokens, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return tok.decode(tokens[0]), len(tokens[0])


# ---- the scheduler, without Ray ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer[0]


@pytest.fixture(scope="module")
def local_model(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "sft" / "local"
    save_random_checkpoint(d, tok, tiny_config(tok))
    return build_model(d, 0, "cpu")[0]


async def collect(stream):
    out = []
    async for tokens in stream:
        out += tokens
    return out


def test_scheduler_batches_queues_and_matches_engine(local_model, tok):
    async def main():
        scheduler = Scheduler(local_model, tok, max_batch=4)
        prompt = tok.encode("Hello there", prepend="<|bos|>")
        outs = await asyncio.gather(*[collect(scheduler.generate(prompt, 12, temperature=0.0)) for _ in range(10)])
        return outs, scheduler.stats()
    outs, stats = asyncio.run(main())
    want = Engine(local_model, tok).generate_batch(tok.encode("Hello there", prepend="<|bos|>"), max_tokens=12,
                                                   temperature=0.0)[0][0]
    assert outs == [want] * 10  # 10 requests through 4 slots: 6 waited in the queue, none was dropped
    assert stats["max_active"] == 4 and stats["requests_finished"] == 10 and stats["in_flight"] == 0
    assert stats["mean_batch"] > 1


def test_scheduler_outlives_an_error_between_steps(local_model, tok, monkeypatch):
    """An error outside a step (here: freeing a cancelled request) fails the requests the decoder held and
    the scheduler goes on serving: a later request gets its answer instead of waiting forever."""
    prompt = tok.encode("Once upon a time", prepend="<|bos|>")

    async def main():
        scheduler = Scheduler(local_model, tok, max_batch=2)
        monkeypatch.setattr(scheduler.decoder, "cancel", lambda request_id: 1 / 0)
        held = asyncio.create_task(collect(scheduler.generate(prompt, 400, temperature=0.0)))
        stream = scheduler.generate(prompt, 400)
        await anext(stream)
        await stream.aclose()  # its cancel raises between two steps
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            await held
        return await asyncio.wait_for(collect(scheduler.generate(prompt, 6, temperature=0.0)), 60), scheduler.stats()

    after, stats = asyncio.run(main())
    assert after == Engine(local_model, tok).generate_batch(prompt, max_tokens=6, temperature=0.0)[0][0]
    assert stats["requests_failed"] == 1 and stats["in_flight"] == 0


def test_scheduler_cancel_timeout_seed_and_reload(local_model, tok, tmp_path):
    prompt = tok.encode("Once upon a time", prepend="<|bos|>")

    async def main():
        scheduler = Scheduler(local_model, tok, max_batch=2, prefix_cache_mb=1, prefix_block=4)
        stream = scheduler.generate(prompt, 400, temperature=1.0, seed=1)
        await anext(stream)
        await stream.aclose()  # the client went away
        await asyncio.sleep(0.05)
        after_cancel = scheduler.stats()
        with pytest.raises(RequestTimeout):
            await collect(scheduler.generate(prompt, 400, timeout_s=0.05))
        a = await collect(scheduler.generate(prompt, 10, temperature=1.0, seed=7))
        before_b = scheduler.stats()
        b = await collect(scheduler.generate(prompt, 10, temperature=1.0, seed=7))  # a's prompt is cached
        after_b = scheduler.stats()
        with pytest.raises(ValueError, match="at most"):
            await collect(scheduler.generate(list(range(SEQ_LEN)), 5))
        # a reload mid-request: the running request finishes on the old weights, new ones use the new
        other = tmp_path / "other"
        save_random_checkpoint(other, tok, tiny_config(tok), seed=5)
        new_model = build_model(other, 0, "cpu")[0]
        long_stream = scheduler.generate(prompt, 60, temperature=0.0)
        long_first = await anext(long_stream)  # it is decoding now
        scheduler.reload(new_model)
        before_short = scheduler.stats()
        assert before_short["draining_decoders"] == 1 and before_short["in_flight"] == 1  # still running at the reload
        long = asyncio.create_task(collect(long_stream))
        short = await collect(scheduler.generate(prompt, 8, temperature=0.0))
        return after_cancel, a, b, long_first + await long, short, new_model, (before_b, after_b, before_short, scheduler.stats())

    after_cancel, a, b, long, short, new_model, (before_b, after_b, before_short, stats) = asyncio.run(main())
    assert after_cancel["requests_cancelled"] == 1 and after_cancel["active"] == 0
    assert stats["requests_timed_out"] == 1
    assert a == b and len(a) == 10
    assert long == Engine(local_model, tok).generate_batch(prompt, max_tokens=60, temperature=0.0)[0][0]
    assert short == Engine(new_model, tok).generate_batch(prompt, max_tokens=8, temperature=0.0)[0][0]
    assert stats["draining_decoders"] == 0 and stats["in_flight"] == 0
    # the prefix cache: b copied a's prompt blocks (all full blocks short of the last token), the same seeded
    # tokens as a; after the reload the same prompt misses (a fresh pool) and the answer is the new model's
    assert after_b["prefix_cache_hits"] == before_b["prefix_cache_hits"] + 1
    assert after_b["prefix_cache_tokens_saved"] - before_b["prefix_cache_tokens_saved"] == (len(prompt) - 1) // 4 * 4
    assert stats["prefix_cache_hits"] == before_short["prefix_cache_hits"]
    assert stats["prefix_cache_lookups"] == before_short["prefix_cache_lookups"] + 1
    saved, looked_up = stats["prefix_cache_tokens_saved"], stats["prefix_cache_prompt_tokens"]
    assert stats["prefix_cache_hit_rate"] == round(saved / looked_up, 4)


# ---- the HTTP layer against a fake engine, without Ray ----------------------------------------------------

class FakeStream:
    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


def fake_client(ready, config):
    from fastapi.testclient import TestClient

    from serve_app.api import EngineClient, build_api

    class FakeEngine(EngineClient):
        async def broadcast(self, method):
            return [{"ready": True, "checkpoint": {"path": "/ckpt"}}] if ready else []  # none loaded yet

        def generate(self, request):
            if request["max_tokens"] == 99:
                return FakeStream([{"prompt_tokens": 3}, {"text": "slow"}, {"error": "timed out", "status": 504}])
            return FakeStream([{"prompt_tokens": 3}, {"text": "hi"}, {"finish_reason": "stop", "completion_tokens": 1}])

    return TestClient(build_api(FakeEngine(None), config))


def test_health_503_until_loaded_and_api_key():
    from serve_app.api import ApiConfig
    body = {"model": "nanochat", "messages": [{"role": "user", "content": "hey"}]}
    loading = fake_client(False, ApiConfig(ui=False))
    assert loading.get("/health").status_code == 503
    client = fake_client(True, ApiConfig(ui=False, api_key="s3cret"))
    assert client.get("/health").status_code == 200  # probes need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert client.get("/v1/models", headers=headers).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    r = client.post("/v1/chat/completions", json=body, headers=good)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"
    assert client.get("/v1/models", headers=good).json()["data"][0]["id"] == "nanochat"
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 99}, headers=good)
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 99, "stream": True}, headers=good)
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def test_request_types_are_strict_and_the_openai_clients_payloads_pass():
    """Loosely typed JSON is a 400 naming the field (as OpenAI's API answers it), not coerced; ints are floats,
    nulls are absent optional fields; and what the real `openai` client sends, streaming included, works."""
    from openai import OpenAI

    from serve_app.api import ApiConfig
    client = fake_client(True, ApiConfig(ui=False))
    user = [{"role": "user", "content": "hey"}]
    loose = {"stream": "yes", "stream_options": {"include_usage": 1}, "max_tokens": "5", "temperature": "1",
             "top_k": 2.5, "seed": True, "n": "1", "messages": [{"role": "user", "content": 5}]}
    for field, value in loose.items():
        r = client.post("/v1/chat/completions", json={"messages": user, field: value})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field and field in error["message"], (field, r.text)
    for fine in ({"temperature": 1}, {"temperature": 0.5, "top_k": None, "seed": None, "max_tokens": None,
                                      "stream_options": None, "model": None}, {"stream": False, "n": 1}):
        assert client.post("/v1/chat/completions", json={"messages": user, **fine}).status_code == 200, fine
    # the real client's own payloads (it talks to the app in-process: TestClient is an httpx client)
    openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    reply = openai.chat.completions.create(model="nanochat", messages=user, temperature=1, max_tokens=5, seed=3,
                                           top_p=1, presence_penalty=0, user="me", extra_body={"top_k": 4})
    assert reply.choices[0].message.content == "hi" and reply.choices[0].finish_reason == "stop"
    chunks = list(openai.chat.completions.create(model="nanochat", messages=user, stream=True,
                                                 stream_options={"include_usage": True}, max_completion_tokens=5))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
    assert chunks[-1].usage.completion_tokens == 1


def test_stats_add_up_the_replicas_and_their_prefix_cache_hit_rate():
    from fastapi.testclient import TestClient

    from serve_app.api import SUMMED_STATS, ApiConfig, EngineClient, build_api

    def replica(saved, prompt_tokens):
        return {**dict.fromkeys(SUMMED_STATS, 1), "max_active": 3, "prefix_cache_tokens_saved": saved,
                "prefix_cache_prompt_tokens": prompt_tokens}

    class TwoReplicas(EngineClient):
        async def broadcast(self, method):
            return [replica(30, 100), replica(10, 300)] if method == "stats" else []

    total = TestClient(build_api(TwoReplicas(None), ApiConfig(ui=False))).get("/stats").json()["total"]
    assert total["prefix_cache_hit_rate"] == 0.1  # (30 + 10) / (100 + 300): tokens, not replicas, weigh
    assert total["prefix_cache_tokens_saved"] == 40 and total["requests_total"] == 2 and total["max_active"] == 3


def test_page_asks_for_the_api_key():
    from serve_app.api import ApiConfig
    client = fake_client(True, ApiConfig(api_key="s3cret"))
    assert client.get("/ui/config").status_code == 401  # the page shows a login form first
    assert client.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
    assert client.post("/ui/login", data={"username": "me", "password": "s3cret"}).status_code == 200
    assert client.get("/ui/config").status_code == 200
    assert fake_client(True, ApiConfig()).get("/ui/config").status_code == 200  # no key: an open page


# ---- one real deployment for the rest of the module -------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url, base, tok, settings):
        self.url, self.base, self.tok, self.settings = url, base, tok, settings
        self.models = {}

    def model(self, tag):
        if tag not in self.models:
            self.models[tag] = build_model(checkpoint_dir("sft", tag, self.base), 0, "cpu")[0]
        return self.models[tag]

    def chat(self, content, **kw):
        body = {"model": "nanochat", "messages": [{"role": "user", "content": content}], **kw}
        return requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=120)

    def stats(self):
        return requests.get(f"{self.url}/stats", timeout=30).json()

    def engine(self):
        from ray import serve
        return serve.get_deployment_handle("NanochatEngine", app_name="nanochat")


@pytest.fixture(scope="module")
def served(ray_cluster, small_tokenizer, tmp_path_factory):
    from ray import serve

    from serve_app.app import build_app
    tok, tok_dir = small_tokenizer
    base = tmp_path_factory.mktemp("serve_base")
    shutil.copytree(tok_dir, base / "tokenizer")
    for seed, tag in enumerate(["v1", "v2", "v3"]):
        save_random_checkpoint(checkpoint_dir("sft", tag, base), tok, tiny_config(tok), seed=seed)
    settings = {"checkpoint": "sft/v1", "base_dir": str(base), "cpus_per_replica": 0.5, "max_batch": 8,
                "timeout_s": 60, "default_max_tokens": 160}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="nanochat")
    yield Served(f"http://127.0.0.1:{port}", base, tok, settings)
    serve.shutdown()


def test_openai_client_greedy_matches_engine(served):
    from openai import OpenAI
    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["nanochat"]
    # special-token strings in user text are text: the prompt counts them as ordinary tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|assistant_end|> there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue? <|bos|>"}]
    want, n = greedy_text(served.model("v1"), served.tok, messages, 40)
    prompt_len = len(served.tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]}))
    reply = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=40)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, n)
    chunks = list(client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want  # pieces of whole characters, in order
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n
    # sampling: a seed fixes the answer, top_k rides in the body
    a, b = (client.chat.completions.create(model="nanochat", messages=messages, temperature=0.9, seed=3,
                                           max_tokens=20, extra_body={"top_k": 40}).choices[0].message.content
            for _ in range(2))
    assert a == b


def test_concurrent_streams_are_batched(served):
    stats = served.stats()
    before, before_steps = stats["total"], stats["replicas"][0]["steps"]

    def stream(i, out):
        r = requests.post(f"{served.url}/v1/chat/completions", stream=True, timeout=120, json={
            "messages": [{"role": "user", "content": f"Tell me a story number {i}"}], "max_tokens": 48,
            "temperature": 0.8, "top_k": 20, "seed": i, "stream": True})  # top-k: no early stop
        lines = [line for line in r.iter_lines() if line]
        out[i] = (r.status_code, lines)

    out = {}
    threads = [threading.Thread(target=stream, args=(i, out)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == list(range(16))
    for status, lines in out.values():
        assert status == 200 and lines[-1] == b"data: [DONE]"
        last = json.loads(lines[-2].removeprefix(b"data: "))
        assert last["choices"][0]["finish_reason"] == "length"
    after = served.stats()
    assert after["total"]["requests_finished"] - before["requests_finished"] == 16
    tokens = after["total"]["tokens_generated"] - before["tokens_generated"]
    steps = after["replicas"][0]["steps"] - before_steps
    assert tokens == 16 * 48
    # 16 clients, 8 slots: batched together (up to the full batch), the rest queued, none dropped
    assert 1 < after["total"]["max_active"] <= served.settings["max_batch"]
    assert tokens / steps > 2, (tokens, steps)  # tokens per decode step: the mean batch size


def test_short_request_overtakes_long_one(served):
    done = {}

    def run(name, max_tokens):
        r = served.chat("Write a long essay about the sea.", max_tokens=max_tokens, temperature=0)
        assert r.status_code == 200
        done[name] = time.monotonic()

    long = threading.Thread(target=run, args=("long", 400))
    long.start()
    deadline = time.monotonic() + 60
    while served.stats()["total"]["active"] == 0:  # the long one is decoding
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run("short", 4)
    long.join()
    assert done["short"] < done["long"]


def test_metrics_count_what_the_clients_saw(served):
    """The node's Prometheus endpoint, before and after a few requests: the time-to-first-token histogram
    counted each answered request once, the outcome counters the 200s and 4xx the client got, the token
    counter the completion tokens the API reported, and the gauges are there per replica."""
    def totals(samples):
        summed = lambda name, **labels: sum(metric_values(samples, name, **labels))  # over the replicas
        return {"ttft": summed("ray_nanochat_serve_ttft_seconds_count"), "tokens": summed("ray_nanochat_serve_tokens_total"),
                "tpot": summed("ray_nanochat_serve_time_per_output_token_seconds_count"),
                **{o: summed("ray_nanochat_serve_requests_total", outcome=o) for o in ("ok", "4xx", "5xx", "cancelled")}}
    time.sleep(3)  # what the earlier tests did is exported by now
    before = totals(scrape_metrics())
    answers = [served.chat(f"Question {i}?", max_tokens=5 + i, temperature=0) for i in range(3)]
    with requests.post(f"{served.url}/v1/chat/completions", stream=True, timeout=60, json={
            "messages": [{"role": "user", "content": "Stream it."}], "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    refused = [served.chat("hi", max_tokens=0), served.chat("hi", temperature=-1)]
    assert [a.status_code for a in answers] == [200] * 3 and [a.status_code for a in refused] == [400, 400]
    tokens = sum(a.json()["usage"]["completion_tokens"] for a in answers) + chunks[-1]["usage"]["completion_tokens"]
    want = {**before, "ttft": before["ttft"] + 4, "tpot": before["tpot"] + 4, "tokens": before["tokens"] + tokens,
            "ok": before["ok"] + 4, "4xx": before["4xx"] + 2}
    samples = wait_for_metrics(lambda samples: samples if totals(samples) == want else None)
    assert_dashboard_finds(samples, "nanochat_serve_")  # the gauges per replica too


def test_limits_are_4xx(served):
    url = f"{served.url}/v1/chat/completions"
    user = {"role": "user", "content": "hi"}
    cases = {
        "body": (413, dict(data=b"{" + b" " * (2 << 20) + b"}")),
        "json": (400, dict(data=b'{"messages": [')),
        "not utf-8": (400, dict(data=b'{"messages": "\xff"}')),
        "no messages": (400, dict(json={"messages": []})),
        "too many": (400, dict(json={"messages": [user, {"role": "assistant", "content": "x"}] * 40 + [user]})),
        "message chars": (400, dict(json={"messages": [{"role": "user", "content": "x" * 20_000}]})),
        "total chars": (400, dict(json={"messages": [user, {"role": "assistant", "content": "y" * 15_000}] * 5
                                        + [user]})),
        "role": (400, dict(json={"messages": [{"role": "tool", "content": "hi"}]})),
        "order": (400, dict(json={"messages": [user, user]})),
        "last not user": (400, dict(json={"messages": [user, {"role": "assistant", "content": "x"}]})),
        "empty": (400, dict(json={"messages": [{"role": "user", "content": "  "}]})),
        "temperature": (400, dict(json={"messages": [user], "temperature": 2.5})),
        "negative temperature": (400, dict(json={"messages": [user], "temperature": -1})),
        "max_tokens": (400, dict(json={"messages": [user], "max_tokens": 0})),
        "max_tokens high": (400, dict(json={"messages": [user], "max_tokens": 10**6})),
        "top_k": (400, dict(json={"messages": [user], "top_k": 0})),
        "n": (400, dict(json={"messages": [user], "n": 2})),
        "content type": (400, dict(json={"messages": [{"role": "user", "content": 5}]})),
        "not an object": (400, dict(json=[user])),
        "context": (400, dict(json={"messages": [{"role": "user", "content": "word " * 3000}]})),
    }
    for name, (status, kw) in cases.items():
        r = requests.post(url, timeout=60, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert message and "Traceback" not in message, (name, message)
    assert "max_tokens" in requests.post(url, json={"messages": [user], "max_tokens": 0}).json()["error"]["message"]
    assert requests.get(f"{served.url}/health").json()["status"] == "ok"


def test_disconnect_cancels_generation(served):
    before = served.stats()["total"]["requests_cancelled"]
    with requests.post(f"{served.url}/v1/chat/completions", stream=True, timeout=60, json={
            # greedy: the random model then never stops early (serve_app/random_model.py), so the
            # generation is still running when the client goes away
            "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 480, "temperature": 0,
            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
    deadline = time.monotonic() + 30
    while not (served.stats()["total"]["requests_cancelled"] > before and served.stats()["total"]["active"] == 0):
        assert time.monotonic() < deadline, served.stats()
        time.sleep(0.1)


# every change of the last assistant message's length, recorded in the page as it happens
WATCH_REPLY = """() => { window.replyLengths = [];
  new MutationObserver(() => { const bots = document.querySelectorAll('[data-testid=bot]');
    if (bots.length) window.replyLengths.push(bots[bots.length - 1].innerText.length); })
  .observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


@contextlib.contextmanager
def chromium_page():
    """A headless Chromium (the system's) and a page in it, for the chat page tests."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: the chat page test needs it (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield browser, browser.new_page(viewport={"width": 1000, "height": 900})


def test_gradio_page_streams_a_reply(served, tmp_path):
    with chromium_page() as (browser, page):
        page.goto(served.url + "/", wait_until="domcontentloaded")  # redirects to /ui/
        assert page.url.rstrip("/").endswith("/ui")
        box = page.get_by_role("textbox").first
        box.wait_for(timeout=60_000)
        page.evaluate(WATCH_REPLY)
        box.fill("Hello, who are you?")
        box.press("Enter")
        bot = page.locator("[data-testid=bot]").last
        bot.wait_for(timeout=60_000)
        text, deadline = None, time.monotonic() + 60
        while bot.inner_text() != text:  # until the reply stops growing
            assert time.monotonic() < deadline
            text = bot.inner_text()
            page.wait_for_timeout(1000)
        lengths = page.evaluate("window.replyLengths")
        page.screenshot(path=str(tmp_path / "chat.png"))
        user_text = page.locator("[data-testid=user]").last.inner_text()
        browser.close()
    assert "Hello, who are you?" in user_text and len(text) > 20
    grew = sorted({n for n in lengths if n > 0})
    assert len(grew) >= 5, lengths  # the reply appeared piece by piece, not at once
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    if os.environ.get("NANOCHAT_SCREENSHOT_DIR"):  # a copy to look at
        shutil.copy(tmp_path / "chat.png", Path(os.environ["NANOCHAT_SCREENSHOT_DIR"]) / "serve_ui.png")


def test_killed_replica_is_replaced(served):
    engine = served.engine()
    (pid,) = engine.broadcast("pid").results(timeout_s=30)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # requests wait for (or retry onto) the replacement
        assert time.monotonic() < deadline, "no replacement replica"
        try:
            r = served.chat("Are you back?", max_tokens=5, temperature=0)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    new_pids = engine.broadcast("pid").results(timeout_s=30)
    assert new_pids and pid not in new_pids
    for _ in range(3):
        assert served.chat("And now?", max_tokens=5).status_code == 200


class Load:
    """Clients sending short requests back to back (streaming and not) until stopped; counts failures."""

    def __init__(self, served, clients=4):
        self.served, self.stop, self.ok, self.failed = served, threading.Event(), 0, []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]

    def client(self, i):
        while not self.stop.is_set():
            stream = i % 2 == 0
            try:
                r = self.served.chat(f"Client {i}: hello", max_tokens=16, stream=stream)
                done = r.status_code == 200 and (not stream or r.text.rstrip().endswith("data: [DONE]"))
                if not done or '"error"' in r.text:
                    self.failed.append((r.status_code, r.text[:300]))
                else:
                    self.ok += 1
            except requests.RequestException as e:
                self.failed.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def answer_is_from(served, tag):
    messages = [{"role": "user", "content": "Which model are you?"}]
    r = served.chat(messages[0]["content"], max_tokens=12, temperature=0)
    return r.json()["choices"][0]["message"]["content"] == greedy_text(served.model(tag), served.tok, messages, 12)[0]


def test_rollout_by_broadcast_reload_fails_no_request(served):
    assert answer_is_from(served, "v1")
    with Load(served) as load:
        time.sleep(1)
        infos = served.engine().broadcast("reload", "sft/v2").results(timeout_s=120)
        time.sleep(1)
    assert [i["checkpoint"]["path"].endswith("v2") for i in infos] == [True]
    assert load.failed == [] and load.ok > 4
    assert answer_is_from(served, "v2")


TRAINED_CHATS = [
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    {"messages": [{"role": "user", "content": "What is 12*34?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"}, {"type": "text", "text": " Done."}]}]},
]


def test_a_trained_model_stops_and_its_tool_calls_stay_hidden(served):
    """A tiny model trained to answer with <|assistant_end|> and to call the calculator: the API reports
    finish_reason "stop" (not "length"), the client never sees a special-token marker, and the calculator's
    result (which the model was never trained to write: tool outputs are out of the loss) reaches it."""
    from tiny_checkpoint import save_memorized_chat_checkpoint
    model = save_memorized_chat_checkpoint(checkpoint_dir("sft", "trained", served.base), served.tok,
                                           tiny_config(served.tok), TRAINED_CHATS)
    (info,) = served.engine().broadcast("reload", "sft/trained").results(timeout_s=120)
    assert info["checkpoint"]["path"].endswith("trained")
    hi = served.chat("Say hi.", temperature=0).json()
    assert hi["choices"][0]["message"]["content"] == "Hi there!" and hi["choices"][0]["finish_reason"] == "stop"
    assert hi["usage"]["completion_tokens"] == len(served.tok.encode("Hi there!"))  # the end token is not counted
    # the same answer, streamed: the calculator's result in the text, no markers, finish "stop"
    want, n = greedy_text(model, served.tok, TRAINED_CHATS[1]["messages"][:1], 40)  # the in-process Engine
    assert "<|python_start|>12*34<|python_end|><|output_start|>408<|output_end|>" in want  # it called the tool
    body = {"messages": TRAINED_CHATS[1]["messages"][:1], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with requests.post(f"{served.url}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "Let me compute: 408 Done."
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == n  # markers and tool output count as generated tokens
    # the 408 is the calculator's: without the engine's tool, the model itself goes on differently
    prompt = served.tok.render_for_completion({"messages": [*TRAINED_CHATS[1]["messages"][:1], {"role": "assistant", "content": ""}]})
    upto_call = served.tok.encode("Let me compute: ")
    ids = prompt + upto_call + [served.tok.special_ids["<|python_start|>"], *served.tok.encode("12*34"),
                                served.tok.special_ids["<|python_end|>"]]
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert "408" not in served.tok.decode(ids[-4:])


def test_rollout_by_redeploy_fails_no_request(served):
    from ray import serve

    from serve_app.app import build_app
    (old_pid,) = served.engine().broadcast("pid").results(timeout_s=30)
    with Load(served) as load:
        time.sleep(1)
        serve.run(build_app({**served.settings, "checkpoint": "sft/v3"}), name="nanochat")  # rolling update
        time.sleep(1)
    assert load.failed == [] and load.ok > 4
    assert served.engine().broadcast("pid").results(timeout_s=30) != [old_pid]
    assert answer_is_from(served, "v3")
    assert requests.get(f"{served.url}/health").json()["checkpoints"][0].endswith("v3")


def test_api_key_on_the_real_deployment_and_in_the_browser(served, tmp_path):
    """Redeployed with an API key (last in the module: the app keeps it): the API refuses requests without it,
    answers with it; the chat page shows a login form, and after the key is given there it chats."""
    from ray import serve

    from serve_app.app import build_app
    key = "s3cret-key"
    serve.run(build_app({**served.settings, "checkpoint": "sft/v3", "api_key": key}), name="nanochat")
    body = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 12, "temperature": 0}
    url = f"{served.url}/v1/chat/completions"
    refused = requests.post(url, json=body, timeout=60)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    assert requests.get(f"{served.url}/stats", timeout=30).status_code == 401
    answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    want = greedy_text(served.model("v3"), served.tok, body["messages"], 12)[0]
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == want
    with chromium_page() as (browser, page):
        page.goto(served.url + "/ui/", wait_until="domcontentloaded")
        password = page.locator("input[type=password]")
        password.wait_for(timeout=60_000)  # a login form, not the chat
        assert page.locator("[data-testid=bot]").count() == 0
        page.locator("input:not([type=password])").first.fill("me")
        password.fill("wrong")
        password.press("Enter")
        page.get_by_text("Incorrect", exact=False).first.wait_for(timeout=30_000)
        page.locator("input:not([type=password])").first.fill("me")  # the failed attempt cleared it
        password.fill(key)
        with page.expect_response(lambda r: "/login" in r.url, timeout=60_000) as login:
            page.get_by_role("button", name="Login").click()
        assert login.value.status == 200
        page.goto(served.url + "/ui/", wait_until="domcontentloaded")  # logged in: the session cookie
        page.locator("input[type=password]").wait_for(state="detached", timeout=60_000)
        box = page.get_by_role("textbox").first
        box.wait_for(timeout=60_000)
        box.fill("Hello!")
        box.press("Enter")
        bot = page.locator("[data-testid=bot]").last
        bot.wait_for(timeout=60_000)
        page.wait_for_function("() => { const b = document.querySelectorAll('[data-testid=bot]'); "
                               "return b.length && b[b.length - 1].innerText.length > 10; }", timeout=60_000)
        page.screenshot(path=str(tmp_path / "chat_with_key.png"))
        browser.close()
