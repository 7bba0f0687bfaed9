"""End-to-end check of weft's API with the official `openai` client.

Run by node/tests/openai_client.rs against `weft up` serving a real model:
python3 openai_e2e.py BASE_URL MODEL_ID CHAT COMPLETION_PREFIX
CHAT is "chat" for a model with a chat template, "no-chat" for one without
(its chats must be refused clearly); COMPLETION_PREFIX is how its greedy
completion of "The capital of France is" starts (llama.cpp's).
"""
import sys

import openai

base, model, chat, prefix = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed")


def chats():
    # chat, whole
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a primary colour."}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content, r
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    whole = r.choices[0].message.content

    # chat, streamed: same text
    parts = []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a primary colour."}],
                                                max_tokens=12, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == whole, ("".join(parts), whole)


if chat == "chat":
    chats()
else:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        raise SystemExit("a chat with a model without a template was accepted")
    except openai.BadRequestError as e:
        assert e.code == "model_has_no_chat_template", e

# completions, whole and streamed, with a stop string
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=24, temperature=0)
text = r.choices[0].text
assert text.startswith(prefix), (text, prefix)
stop = text[len(text) // 2: len(text) // 2 + 3]
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=24, temperature=0, stop=[stop])
assert r.choices[0].finish_reason == "stop", r
assert r.choices[0].text == text[: text.index(stop)], (r.choices[0].text, text, stop)
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=24, temperature=0, stream=True) if c.choices)
assert streamed == text, (streamed, text)

# seeds repeat
a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=5)
b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=5)
assert a.choices[0].text == b.choices[0].text

# errors are openai errors
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    raise SystemExit("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.completions.create(model=model, prompt="x", max_tokens=10**7)
    raise SystemExit("huge max_tokens accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
print("openai client: all checks passed")
