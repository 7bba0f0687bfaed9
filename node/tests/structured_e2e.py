"""Structured outputs and tool calls from a real instruction-tuned model,
through the official `openai` client, checked with `jsonschema`.

Run by node/tests/openai_client.rs against `weft up` serving SmolLM2:
python3 structured_e2e.py BASE_URL MODEL_ID
"""
import json
import os
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=600)


def obj(props, required=None):
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required, "additionalProperties": False}


def s(n=20, **kw):
    return {"type": "string", "maxLength": n, **kw}


# nested objects, arrays with bounds, enums, required and optional fields,
# numbers with ranges, strings with patterns, anyOf, const and $ref (the
# benchmark compiles the same file: bench/src/grammar.rs)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "json_schemas.json")) as f:
    SCHEMAS = json.load(f)
assert len(SCHEMAS) == 20

PROMPTS = [
    "Give an example of a {name} as JSON.",
    "Make up data for a {name}. Answer in JSON only.",
    "Describe a {name} in JSON.",
]

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": obj({"city": s(20), "unit": {"enum": ["celsius", "fahrenheit"]}})}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers",
                                      "parameters": obj({"a": {"type": "integer"}, "b": {"type": "integer"}})}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_PROMPTS = ["What is the weather in Paris?", "What is 12 plus 30?", "Is it cold in Oslo today?"]


def ask_schema(name, prompt):
    r = client.chat.completions.create(
        model=model, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": prompt.format(name=name)}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})
    c = r.choices[0]
    assert c.finish_reason == "stop", (name, prompt, c.finish_reason, c.message.content)
    value = json.loads(c.message.content)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def schemas():
    jobs = [(n, p) for n in SCHEMAS for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: ask_schema(*j), jobs))
    print(f"{len(answers)} schema answers parse and validate")


def json_objects():
    # prompts that say what the object holds: given an open-ended one, a
    # 135M model can repeat keys until max_tokens (finish_reason "length")
    for p in ["Give a JSON object with keys name and age for a person.",
              "Return a JSON object with the keys x and y, two numbers.",
              "Describe a dog as a JSON object with its name and breed."]:
        r = client.chat.completions.create(model=model, max_tokens=200, temperature=0,
                                           messages=[{"role": "user", "content": p}],
                                           response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop", r
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def check_calls(msg, allowed):
    assert msg.tool_calls, msg
    for c in msg.tool_calls:
        assert c.function.name in allowed, c
        assert c.id.startswith("call_"), c
        jsonschema.validate(json.loads(c.function.arguments), TOOL_SCHEMAS[c.function.name])


def tool_calls():
    for p in TOOL_PROMPTS:
        messages = [{"role": "user", "content": p}]
        # parallel calls (the default): every call whole and valid; a 135M
        # model may go on calling until max_tokens, and the calls it closed
        # come back with finish_reason "length"
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason in ("tool_calls", "length"), r
        check_calls(r.choices[0].message, TOOL_SCHEMAS)
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", r
        assert len(r.choices[0].message.tool_calls) == 1, r
        check_calls(r.choices[0].message, TOOL_SCHEMAS)
        named = {"type": "function", "function": {"name": "add"}}
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=named,
                                           max_tokens=120, temperature=0)
        check_calls(r.choices[0].message, {"add"})
        assert len(r.choices[0].message.tool_calls) == 1
        whole = r.choices[0].message.tool_calls
        # streamed: the official client's reassembly gives the same call
        with client.chat.completions.stream(model=model, messages=messages, tools=TOOLS, tool_choice=named,
                                            max_tokens=120, temperature=0) as stream:
            final = stream.get_final_completion()
        got = final.choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in got] == \
            [(c.function.name, c.function.arguments) for c in whole], (got, whole)
        # a function tool_choice names: OpenAI says "stop"
        assert final.choices[0].finish_reason == "stop", final
        # the result goes back and the model answers
        call = whole[0]
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "42"}]
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=24, temperature=0)
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r
    print("tool calls: required, named, streamed and answered")


def invalid_schema():
    try:
        client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "wrong"}}}}})
        raise SystemExit("an invalid schema was accepted")
    except openai.BadRequestError as e:
        assert e.param == "response_format", e


FREE = ["Name three colours.", "Write a haiku about rain.", "What is the capital of Italy?"]


def free(p):
    r = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                       messages=[{"role": "user", "content": p}])
    return r.choices[0].message.content


def mixed_batch():
    alone = [free(p) for p in FREE]
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(ask_schema, n, PROMPTS[0]) for n in list(SCHEMAS)[:5]]
        together = [pool.submit(free, p) for p in FREE]
        got = [f.result() for f in together]
        for f in constrained:
            f.result()
    assert got == alone, (got, alone)
    print("free sequences batched with constrained ones keep their tokens")


# a value for each field of OpenAI's requests, as a client would send it
SAMPLE = {
    "messages": [{"role": "user", "content": "hi"}], "model": model, "prompt": "hi", "max_tokens": 2,
    "max_completion_tokens": 2, "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.1,
    "function_call": "auto", "functions": [{"name": "f"}], "logit_bias": {"50": -100}, "logprobs": True,
    "metadata": {"k": "v"}, "modalities": ["text", "audio"], "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.1, "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "seed": 1, "service_tier": "flex", "stop": ["zz"], "store": True,
    "stream": False, "stream_options": {"include_usage": True}, "temperature": 0, "tool_choice": "none",
    "tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 1, "top_p": 0.9, "user": "u",
    "web_search_options": {}, "verbosity": "low", "prompt_cache_key": "k", "safety_identifier": "s",
    "best_of": 3, "echo": True, "suffix": "end",
}


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def every_field_is_handled():
    for path, params, base_body in [
        ("/v1/chat/completions", chat_params.CompletionCreateParamsBase,
         {"model": model, "messages": SAMPLE["messages"], "max_tokens": 2}),
        ("/v1/completions", completion_params.CompletionCreateParamsBase,
         {"model": model, "prompt": "hi", "max_tokens": 2}),
    ]:
        fields = sorted(params.__annotations__)
        for field in fields:
            value = SAMPLE.get(field, "x")
            if path == "/v1/completions" and field == "logprobs":
                value = 1
            body = dict(base_body, **{field: value})
            status, v = post(path, body)
            # implemented (200), or refused with a 400 naming the field
            assert status == 200 or (status == 400 and v["error"]["param"] == field), (path, field, status, v)
        print(f"{path}: all {len(fields)} fields of the openai package's request handled")


schemas()
json_objects()
tool_calls()
invalid_schema()
mixed_batch()
every_field_is_handled()
