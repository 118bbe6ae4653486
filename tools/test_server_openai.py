#!/usr/bin/env python3
"""Drives a running `gyre serve` with the official `openai` client (PyPI), unchanged.

Checks: the model list; chat and completions, streaming and not (stream text == non-stream
text, usage, finish reasons); logprobs; stop strings; n=2 refused with a 400; 32 concurrent
streaming greedy clients whose outputs equal their single-request outputs (and the engine really
batched them); a multi-turn chat whose second turn hits the prefix-state cache (checked in the
response's cached_tokens and in /metrics), with the time to first token of both turns reported.

Usage: python3 tools/test_server_openai.py --base-url http://127.0.0.1:PORT [--api-key KEY]
           [--expected crates/gyre-cli/tests/fixtures/expected.json] [--clients 32]
Run by `cargo test` (crates/gyre-cli/tests/serve.rs). Needs tools/requirements-test.txt.
Exits non-zero on the first failed check.
"""

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request

import openai
from openai import OpenAI

CHAT_PROMPTS = [
    "What does the licence say?",
    "Who may copy the work?",
    "Tell me about warranties.",
    "Can I sell copies?",
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def metrics(base_url, api_key):
    req = urllib.request.Request(base_url + "/metrics")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat_once(client, model, messages, max_tokens, **kw):
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )
    return r


def stream_chat(client, model, messages, max_tokens, include_usage=True, **kw):
    """Streams a chat completion; returns (text, finish_reason, usage, chunks)."""
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": include_usage},
        **kw,
    )
    text, finish, usage, n = [], None, None, 0
    for chunk in stream:
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta and c.delta.content:
                text.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return "".join(text), finish, usage, n


def test_models(client, model):
    ids = [m.id for m in client.models.list().data]
    check(model in ids, f"/v1/models lists {ids}, not {model}")
    print(f"ok   models: {ids}")


def test_chat_and_completions(client, model):
    msgs = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    r = chat_once(client, model, msgs, 24)
    c = r.choices[0]
    check(c.message.role == "assistant", "role is assistant")
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
    check(r.usage.prompt_tokens > 0, "usage.prompt_tokens > 0")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    check(r.usage.completion_tokens <= 24, "completion_tokens <= max_tokens")
    text, finish, usage, _ = stream_chat(client, model, msgs, 24)
    check(text == c.message.content, f"stream {text!r} != non-stream {c.message.content!r}")
    check(finish == c.finish_reason, "stream finish_reason")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, "stream usage")
    print(f"ok   chat: {text!r} ({finish}, {usage.completion_tokens} tokens)")

    # max_completion_tokens (the newer name) and a length finish.
    r = client.chat.completions.create(
        model=model, messages=msgs, max_completion_tokens=3, temperature=0
    )
    check(r.usage.completion_tokens <= 3, "max_completion_tokens honoured")

    r = client.completions.create(model=model, prompt="The licence grants", max_tokens=20, temperature=0)
    ct = r.choices[0].text
    check(r.choices[0].finish_reason in ("stop", "length"), "completion finish_reason")
    parts, finish = [], None
    for chunk in client.completions.create(
        model=model, prompt="The licence grants", max_tokens=20, temperature=0, stream=True
    ):
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    check("".join(parts) == ct, f"stream completion {''.join(parts)!r} != {ct!r}")
    check(finish == r.choices[0].finish_reason, "stream completion finish_reason")
    print(f"ok   completions: {ct!r}")

    # Sampling parameters are accepted; the same seed gives the same text.
    kw = dict(model=model, messages=msgs, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
              presence_penalty=0.5, frequency_penalty=0.5, extra_body={"top_k": 40, "min_p": 0.05})
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    check(a == b, f"seeded sampling differs: {a!r} vs {b!r}")
    print("ok   seeded sampling is reproducible")


def test_expected(client, model, path):
    """Greedy outputs equal the reference (transformers) outputs of the fixture."""
    with open(path) as f:
        exp = json.load(f)
    for g in exp["generate"]:
        r = client.completions.create(
            model=model, prompt=g["prompt"], max_tokens=len(g["ids"]), temperature=0
        )
        check(r.choices[0].text == g["text"], f"completion {r.choices[0].text!r} != {g['text']!r}")
    for c in exp.get("chat", []):
        r = chat_once(client, model, [{"role": "user", "content": c["message"]}], len(c["ids"]))
        got = r.choices[0].message.content
        # The reference text may end in whitespace that a stop rule would keep; compare prefix.
        check(c["text"].startswith(got) and len(got) > 0, f"chat {got!r} vs {c['text']!r}")
    print("ok   greedy outputs equal the fixture's reference outputs")


def test_logprobs_and_stop(client, model):
    msgs = [{"role": "user", "content": CHAT_PROMPTS[1]}]
    r = chat_once(client, model, msgs, 8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens, "one logprob entry per token")
    for t in content:
        check(len(t.top_logprobs) == 3, "3 top logprobs")
        check(t.logprob <= 0, "logprob <= 0")
        check(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4, "greedy token is the most likely")
    r = client.completions.create(model=model, prompt="The licence", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs), "legacy logprobs")
    print("ok   logprobs")

    full = chat_once(client, model, msgs, 24).choices[0].message.content
    if len(full) >= 6:
        stop = full[3:6]
        want = full[: full.index(stop)]
        r = chat_once(client, model, msgs, 24, stop=[stop, "\u0000never"])
        check(r.choices[0].message.content == want, f"stop: {r.choices[0].message.content!r} != {want!r}")
        check(r.choices[0].finish_reason == "stop", "stop finish_reason")
        text, finish, _, _ = stream_chat(client, model, msgs, 24, stop=stop)
        check(text == want and finish == "stop", f"streamed stop: {text!r}")
        print(f"ok   stop strings ({stop!r})")


def test_errors(client, model):
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2
        )
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "n" == (e.body or {}).get("param"), f"n=2 error: {e.body}")
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-5
        )
        raise AssertionError("max_tokens=-5 was accepted")
    except openai.BadRequestError:
        pass
    print("ok   bad requests raise BadRequestError")


def test_concurrency(client, model, base_url, api_key, clients):
    prompts = [
        [{"role": "user", "content": f"{CHAT_PROMPTS[i % len(CHAT_PROMPTS)]} (question {i})"}]
        for i in range(clients)
    ]
    max_tokens = 24
    single = [chat_once(client, model, p, max_tokens).choices[0].message.content for p in prompts]
    before = metrics(base_url, api_key)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        got = list(pool.map(lambda p: stream_chat(client, model, p, max_tokens)[0], prompts))
    dt = time.perf_counter() - t0
    after = metrics(base_url, api_key)
    for i, (a, b) in enumerate(zip(single, got)):
        check(a == b, f"client {i}: concurrent {b!r} != single {a!r}")
    steps = after["gyre_engine_steps_total"] - before["gyre_engine_steps_total"]
    tokens = after["gyre_generated_tokens_total"] - before["gyre_generated_tokens_total"]
    check(steps < tokens, f"no batching: {steps} steps for {tokens} tokens")
    print(
        f"ok   {clients} concurrent streaming clients equal their single runs "
        f"({tokens:.0f} tokens in {steps:.0f} steps, {dt:.2f} s)"
    )


def first_token_time(client, model, messages):
    """Seconds to the first generated token (a chunk carrying logprobs), and the stream's usage."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True,
    )
    ttft, text, usage = None, [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if ttft is None and c.logprobs is not None and c.logprobs.content:
                ttft = time.perf_counter() - t0
            if c.delta and c.delta.content:
                text.append(c.delta.content)
    return ttft if ttft is not None else time.perf_counter() - t0, "".join(text), usage


def test_prefix_cache(client, model, base_url, api_key, history_words, rounds):
    """A long chat resent with one more turn pays prefill only for the new turn."""
    first, second, cached = [], [], []
    for r in range(rounds):
        filler = " ".join(f"the licence{r} grants rights{i % 7}" for i in range(history_words // 4))
        # The history goes in a user turn: some templates (Gemma) have no system role.
        msgs = [{"role": "user", "content": f"Conversation {r}. {filler} Summarise the licence."}]
        before = metrics(base_url, api_key)
        t1, reply, u1 = first_token_time(client, model, msgs)
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And warranties?"}]
        t2, _, u2 = first_token_time(client, model, msgs)
        after = metrics(base_url, api_key)
        check(u2.prompt_tokens > u1.prompt_tokens, "the second turn's prompt is longer")
        c2 = u2.prompt_tokens_details.cached_tokens
        check(c2 >= u1.prompt_tokens // 2, f"second turn reused only {c2} of {u2.prompt_tokens} tokens")
        hits = after["gyre_prefix_cache_hits_total"] - before["gyre_prefix_cache_hits_total"]
        check(hits >= 1, "/metrics counts the prefix-cache hit")
        first.append(t1)
        second.append(t2)
        cached.append((u2.prompt_tokens, c2))
    m1, m2 = statistics.median(first), statistics.median(second)
    print(
        f"ok   prefix cache: prompts {cached[0][0]} tokens, {cached[0][1]} from the cache on turn 2; "
        f"time to first token turn 1 {m1 * 1000:.1f} ms, turn 2 {m2 * 1000:.1f} ms "
        f"(median of {rounds}): {m1 / m2:.1f}x faster"
    )
    return m1 / m2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="http://HOST:PORT of gyre serve")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--expected", default=None, help="expected.json of the tiny_chat fixture")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--history-words", type=int, default=300, help="words of chat history")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["all", "prefix"], default="all")
    a = ap.parse_args()
    base = a.base_url.rstrip("/")
    client = OpenAI(base_url=base + "/v1", api_key=a.api_key or "unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    if a.only == "all":
        test_models(client, model)
        test_chat_and_completions(client, model)
        if a.expected:
            test_expected(client, model, a.expected)
        test_logprobs_and_stop(client, model)
        test_errors(client, model)
        test_concurrency(client, model, base, a.api_key, a.clients)
    test_prefix_cache(client, model, base, a.api_key, a.history_words, a.rounds)
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
