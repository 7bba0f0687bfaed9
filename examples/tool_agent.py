"""A tool-calling agent: the model picks a tool and its arguments, weft
returns the call (its shape held to the tool's schema by constrained
decoding), the script runs it in a sandbox on the same node, never on the
machine it runs on, and sends the result back for the model's answer.

Needs only `openai` and `requests` (pip install openai requests):

    python3 examples/tool_agent.py "What is 2 to the power of 20?"

WEFT_URL is the node (default http://127.0.0.1:8080), WEFT_API_KEY its key
(when it has keys), WEFT_MODEL the model (default: the first it serves).
"""

import json
import os
import sys

import requests
from openai import OpenAI

BASE = os.environ.get("WEFT_URL", "http://127.0.0.1:8080")
KEY = os.environ.get("WEFT_API_KEY", "none")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run_python",
            "description": "Runs a short Python 3 program and returns what it prints.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "maxLength": 300}},
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "shell",
            "description": "Runs one POSIX shell command and returns its output.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string", "maxLength": 200}},
                "required": ["command"],
                "additionalProperties": False,
            },
        },
    },
]


def run_in_sandbox(api: requests.Session, sandbox: str, name: str, args: dict) -> str:
    """Runs one call in the sandbox: untrusted code, confined there."""
    cmd = ["python3", "-c", args["code"]] if name == "run_python" else ["sh", "-c", args["command"]]
    r = api.post(f"{BASE}/v1/sandboxes/{sandbox}/exec", json={"cmd": cmd, "timeout_s": 10})
    r.raise_for_status()
    done = r.json()
    return json.dumps({"exit_code": done["exit_code"], "stdout": done["stdout"]["data"][-2000:],
                       "stderr": done["stderr"]["data"][-2000:]})


def main() -> int:
    task = " ".join(sys.argv[1:]) or "What is 2 to the power of 20?"
    llm = OpenAI(base_url=f"{BASE}/v1", api_key=KEY)
    model = os.environ.get("WEFT_MODEL") or llm.models.list().data[0].id
    messages = [{"role": "user", "content": task}]
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY}"
    r = api.post(f"{BASE}/v1/sandboxes", json={"memory_mb": 128, "timeout_s": 120})
    r.raise_for_status()
    sandbox = r.json()["id"]
    print(f"sandbox {sandbox}")
    try:
        # the first turn must call a tool; later ones may answer
        for turn in range(3):
            reply = llm.chat.completions.create(
                model=model, messages=messages, tools=TOOLS, max_tokens=160, temperature=0,
                tool_choice="required" if turn == 0 else "auto",
            )
            msg = reply.choices[0].message
            if not msg.tool_calls:
                print(f"answer: {msg.content}")
                break
            messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in msg.tool_calls]})
            for call in msg.tool_calls:
                args = json.loads(call.function.arguments)
                print(f"call {call.id}: {call.function.name}({args})")
                result = run_in_sandbox(api, sandbox, call.function.name, args)
                print(f"result: {result}")
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        else:
            print("no answer after 3 turns")
    finally:
        api.delete(f"{BASE}/v1/sandboxes/{sandbox}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
