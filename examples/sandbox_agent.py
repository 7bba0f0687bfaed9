"""An agent that asks a weft node's model for a shell command and runs it
in a sandbox on the same node, never on the machine it runs on.

Needs only `openai` and `requests` (pip install openai requests):

    python3 examples/sandbox_agent.py "How many programs are in /usr/bin?"

WEFT_URL is the node (default http://127.0.0.1:8080), WEFT_API_KEY its key
(when it has keys), WEFT_MODEL the model (default: the first it serves).
"""

import os
import sys

import requests
from openai import OpenAI

BASE = os.environ.get("WEFT_URL", "http://127.0.0.1:8080")
KEY = os.environ.get("WEFT_API_KEY", "none")


def suggest_command(llm: OpenAI, model: str, task: str) -> str:
    """The model's shell command for `task`: untrusted text, to be run only
    in a sandbox."""
    reply = llm.chat.completions.create(
        model=model,
        max_tokens=48,
        temperature=0,
        messages=[
            {"role": "system", "content": "Answer with one POSIX shell command and nothing else."},
            {"role": "user", "content": task},
        ],
    )
    text = reply.choices[0].message.content or ""
    # the first line that is not a code fence, without inline backticks
    lines = [l.strip() for l in text.splitlines()]
    commands = [l.strip("`").removeprefix("$ ") for l in lines if l and not l.startswith("```")]
    return next((c for c in commands if c), "true")


def main() -> int:
    task = " ".join(sys.argv[1:]) or "Print the date."
    llm = OpenAI(base_url=f"{BASE}/v1", api_key=KEY)
    model = os.environ.get("WEFT_MODEL") or llm.models.list().data[0].id
    command = suggest_command(llm, model, task)
    print(f"model {model} suggests: {command}")

    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY}"
    r = api.post(f"{BASE}/v1/sandboxes", json={"memory_mb": 128, "timeout_s": 60})
    r.raise_for_status()
    sandbox = r.json()
    print(f"sandbox {sandbox['id']} ({sandbox['isolation']}, {sandbox['launch']} start)")
    try:
        r = api.post(
            f"{BASE}/v1/sandboxes/{sandbox['id']}/exec",
            json={"cmd": ["sh", "-c", command], "timeout_s": 10},
        )
        r.raise_for_status()
        done = r.json()
        for stream in ("stdout", "stderr"):
            out = done[stream]
            if out["data"]:
                print(f"{stream} ({out['encoding']}):\n{out['data']}", end="")
        print(f"exit code {done['exit_code']}, signal {done['signal']}, "
              f"timed out {done['timed_out']}, {done['duration_ms']} ms")
    finally:
        api.delete(f"{BASE}/v1/sandboxes/{sandbox['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
