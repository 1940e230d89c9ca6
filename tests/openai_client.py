"""Drives a running `kiln serve` with the official `openai` client; exits non-zero on the first failure.

    python3 tests/openai_client.py BASE_URL MODEL_NAME EXPECTED_GREEDY_TEXT EXPECTED_CHAT_PREFIX

EXPECTED_CHAT_PREFIX: how llama.cpp's greedy answer to "What is the capital of France?" starts under SmolLM2's
chat template (with its default system prompt), from tests/fixtures/llama_cpp_chat.json.
"""
import json
import sys
import urllib.request

import openai

base_url, model, expected, chat_prefix = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


ids = [m.id for m in client.models.list().data]
check(ids == [model], f"models.list gives {ids}")

prompt = "The capital of France is"
c = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
check(c.choices[0].text == expected, f"greedy completion {c.choices[0].text!r} != kiln run's {expected!r}")
check(c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 16, f"usage {c.usage}")
check(c.choices[0].finish_reason == "length", f"finish_reason {c.choices[0].finish_reason}")

streamed = "".join(ch.choices[0].text for ch in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True))
check(streamed == expected, f"streamed completion {streamed!r}")

s = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0, stop=["\n"])
check(s.choices[0].text == expected.split("\n")[0] and s.choices[0].finish_reason == "stop", f"stop: {s.choices[0]}")

messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
answer = chat.choices[0].message.content
check(answer.startswith(chat_prefix) and chat.choices[0].message.role == "assistant", f"chat answer {answer!r}")
chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True))
check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
check("".join(c.choices[0].delta.content or "" for c in chunks) == answer, "streamed chat equals non-streamed chat")
check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "last chunk has a finish_reason")

check(all(c.usage is None for c in chunks), "no usage chunks unless asked for")
with_usage = list(client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
check(with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == chat.usage.completion_tokens, f"usage chunk {with_usage[-1]}")

# n choices: each its own generation (greedy ones agree), in index order; usage counts the prompt once.
three = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, n=3)
check([t.index for t in three.choices] == [0, 1, 2] and all(t.text == expected for t in three.choices), f"n=3 greedy {three.choices}")
check(three.usage.prompt_tokens == 5 and three.usage.completion_tokens == 48, f"n=3 usage {three.usage}")
sampled = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=1.0, seed=7, n=4)
check(len({t.text for t in sampled.choices}) > 1, f"n=4 sampled choices all alike: {[t.text for t in sampled.choices]}")
by_index = {}
for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, n=2, stream=True):
    for choice in ch.choices:
        entry = by_index.setdefault(choice.index, {"text": "", "role": None, "finish": None})
        entry["text"] += choice.delta.content or ""
        entry["role"] = entry["role"] or choice.delta.role
        entry["finish"] = choice.finish_reason or entry["finish"]
check(sorted(by_index) == [0, 1] and all(e["text"] == answer and e["role"] == "assistant" and e["finish"] for e in by_index.values()), f"n=2 streamed chat {by_index}")

penalized = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, frequency_penalty=2.0)
check(penalized.choices[0].text != expected, "a frequency penalty changes the greedy continuation")
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=4, presence_penalty=3.0)
    check(False, "presence_penalty 3 accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "presence_penalty", f"400 body {e.body}")

lp = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
logprobs = lp.choices[0].logprobs
check("".join(logprobs.tokens) == lp.choices[0].text, f"logprob tokens {logprobs.tokens} spell {lp.choices[0].text!r}")
check(all(len(t) == 3 for t in logprobs.top_logprobs), "3 alternatives per token")
check(all(abs(max(t.values()) - v) < 1e-6 for t, v in zip(logprobs.top_logprobs, logprobs.token_logprobs)), "greedy picks the top alternative")
# llama.cpp (full-precision attention) gives " Paris" a log-probability of -0.2644 at the first position.
check(logprobs.tokens[0] == " Paris" and abs(logprobs.token_logprobs[0] - (-0.2644)) < 0.05, f"first logprob {logprobs.token_logprobs[0]}")
chat_lp = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
content = chat_lp.choices[0].logprobs.content
check("".join(t.token for t in content) == chat_lp.choices[0].message.content and all(len(t.top_logprobs) == 2 for t in content), "chat logprobs")
check(c.choices[0].logprobs is None, "no logprobs unless asked for")

a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
check(a.choices[0].text == b.choices[0].text, "the same seed gives the same sample")

try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found", f"404 body {e.body}")
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=10**9)
    check(False, "huge max_tokens accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "max_tokens", f"400 body {e.body}")

# The prompt as token ids (no BOS added: the ids are the prompt), echo, and logit_bias.
tokens = [504, 3575, 282, 4649, 314]  # SmolLM2's ids of "The capital of France is"
by_ids = client.completions.create(model=model, prompt=tokens, max_tokens=16, temperature=0)
check(by_ids.choices[0].text == expected and by_ids.usage.prompt_tokens == 5, f"token prompt: {by_ids.choices[0].text!r}")
echoed = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, echo=True)
check(echoed.choices[0].text == prompt + expected, f"echo: {echoed.choices[0].text!r}")
streamed_echo = "".join(ch.choices[0].text for ch in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, echo=True, stream=True))
check(streamed_echo == prompt + expected, f"streamed echo: {streamed_echo!r}")
first = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=1)
tokenize = urllib.request.Request(base_url.removesuffix("/v1") + "/tokenize", data=json.dumps({"prompt": first.choices[0].text, "add_special_tokens": False}).encode(), headers={"Content-Type": "application/json"})
top_id = json.load(urllib.request.urlopen(tokenize))["tokens"][0]
biased = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(top_id): -100})
check(biased.choices[0].text != first.choices[0].text, f"logit_bias -100 on {top_id} still gives {biased.choices[0].text!r}")

# Chat content as text parts, and the developer role (passed to the template as system).
parts = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}], max_tokens=24, temperature=0)
check(parts.choices[0].message.content == answer, f"text parts: {parts.choices[0].message.content!r}")
system = [{"role": "system", "content": "Answer in one word."}, messages[0]]
developer = [{"role": "developer", "content": "Answer in one word."}, messages[0]]
as_system = client.chat.completions.create(model=model, messages=system, max_tokens=8, temperature=0)
as_developer = client.chat.completions.create(model=model, messages=developer, max_tokens=8, temperature=0)
check(as_system.choices[0].message.content == as_developer.choices[0].message.content, "developer is system")

# What kiln does not implement is refused, not ignored.
for what, call in [
    ("tools", lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=4, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
    ("response_format", lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=4, response_format={"type": "json_object"})),
    ("suffix", lambda: client.completions.create(model=model, prompt=prompt, max_tokens=4, suffix="!")),
    ("messages", lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], max_tokens=4)),
]:
    try:
        call()
        check(False, f"{what} accepted")
    except openai.BadRequestError as e:
        check(e.body["param"] == what, f"400 body {e.body}")

print(f"openai client: {checks} passed, 0 failed")
