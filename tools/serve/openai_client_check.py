"""Drives a running `prefix-tune serve` with the official `openai` client (tests/serve_openai.rs
starts the server, writes the expected results and runs this with the pinned client from
tools/serve/setup_client.sh).

    python openai_client_check.py SPEC.json

SPEC: {"base_url", "api_key", "metrics_url", "models": [ids], "cases": [{"model", "prompt",
"max_tokens", "tokens", "text", "finish"}], "chat": {"model", "messages", "max_tokens", "tokens",
"text"}, "long_model"}. Every check prints one line; the last line says how many passed and
failed, and the exit status is non-zero when any failed.
"""

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

spec = json.load(open(sys.argv[1]))
client = openai.OpenAI(base_url=spec["base_url"], api_key=spec["api_key"], max_retries=0)
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok   {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        results.append((name, e))
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)


def eq(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def complete(case, **kw):
    return client.completions.create(
        model=case["model"],
        prompt=case["prompt"],
        max_tokens=case["max_tokens"],
        temperature=0,
        extra_body={"return_token_ids": True},
        **kw,
    )


def check_completion(case, r):
    c = r.choices[0]
    eq(c.text, case["text"], f"{case['model']} text")
    eq((c.model_extra or {}).get("token_ids"), case["tokens"], f"{case['model']} token ids")
    eq(c.finish_reason, case["finish"], f"{case['model']} finish_reason")
    eq(r.usage.completion_tokens, len(case["tokens"]), "usage.completion_tokens")
    eq(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens, "usage total")


def models():
    eq([m.id for m in client.models.list()], spec["models"], "model ids")


def completions():
    for case in spec["cases"]:
        check_completion(case, complete(case))


def concurrent_mixed_prefixes():
    cases = spec["cases"] * 3
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        answers = list(pool.map(complete, cases))
    for case, r in zip(cases, answers):
        check_completion(case, r)


def streaming_completion():
    for case in spec["cases"]:
        text, finish, usage = "", None, None
        for chunk in complete(case, stream=True):
            eq(chunk.object, "text_completion", "chunk object")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        eq(text, case["text"], f"{case['model']} streamed text")
        eq(finish, case["finish"], "streamed finish_reason")
        eq(usage.completion_tokens, len(case["tokens"]), "streamed usage")


def chat():
    ch = spec["chat"]
    r = client.chat.completions.create(
        model=ch["model"], messages=ch["messages"], max_tokens=ch["max_tokens"], temperature=0
    )
    eq(r.object, "chat.completion", "object")
    eq(r.choices[0].message.role, "assistant", "role")
    eq(r.choices[0].message.content, ch["text"], "chat content")
    eq(r.usage.completion_tokens, len(ch["tokens"]), "chat usage")


def streaming_chat():
    ch = spec["chat"]
    stream = client.chat.completions.create(
        model=ch["model"],
        messages=ch["messages"],
        max_tokens=ch["max_tokens"],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    role, text, usage = None, "", None
    for chunk in stream:
        eq(chunk.object, "chat.completion.chunk", "chunk object")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            role = role or c.delta.role
            text += c.delta.content or ""
    eq(role, "assistant", "streamed role")
    eq(text, ch["text"], "streamed chat content")
    eq(usage.completion_tokens, len(ch["tokens"]), "streamed chat usage")


def expect_error(cls, status, fn, param=None):
    try:
        fn()
    except cls as e:
        eq(e.status_code, status, f"{cls.__name__} status")
        body = e.body if isinstance(e.body, dict) else {}
        if param is not None:
            eq(body.get("param"), param, "error param")
        if not body.get("message"):
            raise AssertionError(f"no error message in {e.body!r}")
        return
    raise AssertionError(f"no {cls.__name__} raised")


def errors():
    case = spec["cases"][0]
    expect_error(
        openai.NotFoundError,
        404,
        lambda: client.completions.create(model="no-such-model", prompt="a", max_tokens=2),
        "model",
    )
    expect_error(
        openai.BadRequestError,
        400,
        lambda: client.completions.create(model=case["model"], prompt="a", temperature=5),
        "temperature",
    )
    expect_error(
        openai.BadRequestError,
        400,
        lambda: client.completions.create(model=case["model"], prompt="a", max_tokens=10**9),
        "max_tokens",
    )
    expect_error(
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(model=case["model"], messages="hi", max_tokens=2),
        "messages",
    )
    wrong = openai.OpenAI(base_url=spec["base_url"], api_key="sk-wrong", max_retries=0)
    expect_error(openai.AuthenticationError, 401, lambda: wrong.models.list())


def metric(name):
    text = urllib.request.urlopen(spec["metrics_url"]).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def disconnect_mid_stream():
    before = metric("prefix_tune_cancelled_sequences_total")
    stream = client.completions.create(
        model=spec["long_model"],
        prompt="the cat",
        max_tokens=40000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    it = iter(stream)
    next(it)
    next(it)
    stream.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while metric("prefix_tune_cancelled_sequences_total") < before + 1:
        if time.time() > deadline:
            raise AssertionError("the server did not cancel the abandoned stream")
        time.sleep(0.05)
    while metric("prefix_tune_batch_occupancy") != 0:
        if time.time() > deadline:
            raise AssertionError("the abandoned stream kept its place in the batch")
        time.sleep(0.05)
    # And the server goes on answering.
    check_completion(spec["cases"][0], complete(spec["cases"][0]))


print(f"openai {openai.__version__}", flush=True)
check("models.list", models)
check("completions (mixed prefixes) = generate", completions)
check("concurrent completions, mixed prefixes = generate", concurrent_mixed_prefixes)
check("streamed completions = generate", streaming_completion)
check("chat.completions = generate on the template", chat)
check("streamed chat.completions", streaming_chat)
check("errors as openai exceptions", errors)
check("disconnect mid-stream", disconnect_mid_stream)
failed = sum(1 for _, e in results if e is not None)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
