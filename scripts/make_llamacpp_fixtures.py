#!/usr/bin/env python3
"""Writes the llama.cpp reference fixtures the real-model tests compare against.

Usage: python3 scripts/make_llamacpp_fixtures.py MODEL.gguf OUT.json

The committed fixtures:
  node/tests/fixtures/llamacpp_gemma3_270m.json    (gemma-3-270m-q4_k_m.gguf)
  node/tests/fixtures/llamacpp_smollm2_135m.json   (SmolLM2-135M-Instruct.Q4_1.gguf)

Needs `pip install llama-cpp-python` (it builds llama.cpp from source, about
16 minutes on 2 cores). CI does not run this: it compares against the
committed JSON. For every prompt it records llama.cpp's token ids, its greedy
continuation, and at each generated position the gap between the two best
logits, and its five best tokens with their logits, so a test can tell a real
divergence from llama.cpp's own near-ties. For a model with a chat template
it also records llama-cpp-python's Jinja rendering (the formatter its chat
API uses) of several conversations, with and without tools, and the ids of
each rendering.
"""
import hashlib
import json
import sys

import llama_cpp
import numpy as np

GEN_TOKENS = 40

LONG = " ".join(
    f"Section {i}: the river town of Aldermere kept a ledger of every boat that passed, "
    f"noting the cargo, the captain and the weather on day {i}."
    for i in range(1, 31)
) + " Summarize what the ledger of Aldermere recorded:"

CHAT_PROMPTS = {
    "gemma3": "<bos><start_of_turn>user\nWrite a haiku about autumn leaves.<end_of_turn>\n<start_of_turn>model\n",
    "llama": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
}

PROMPTS = [
    ("short", "The capital of France is", False),
    ("question", "Why is the sky blue? Explain briefly.", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("french", "Il était une fois, dans un petit village de Provence,", False),
    ("chinese", "人工智能的未来发展方向是", False),
    ("emoji", "My favourite emoji are 🚀 and 🌍 because", False),
    ("list", "Here is a list of five fruits:\n1.", False),
    ("long", LONG, False),
]

TOKENIZER_TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "tabs\tand\nnewlines\n\n\nthree",
    "Ünïcödé façade naïve café",
    "日本語のテキストと中文",
    "emoji 🧑‍🚀👍🏽 and flags 🇫🇷",
    "<b>bold</b> and <table> tags",
    "mixed123numbers 4.5e-3 and symbols #@!$%^&*()",
    "    indented code block",
    "Ελληνικά και русский текст",
    "fn main() {\n\tlet x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "numbers 1234567 and 3.14159, 1,000,000 and ½ ² ٣",
    "   leading\n\n\n\n  trailing   \t\t  ",
    "don't you're we'll I'd THEY'RE",
    "Ünïcödé 🇯🇵🏳️‍🌈 ZWJ 👨‍👩‍👧‍👦 and a lone é",
]

# A template that uses tools (Hermes-style, written for these fixtures): the
# same Jinja rendered by llama-cpp-python here and by weft's minijinja.
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{%- endif %}"
    "{{ 'You may call functions. Their signatures:\n<tools>\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\n' }}{%- endfor %}"
    "{{ '</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\n' + (message.content | trim) }}"
    "{%- for tc in message.tool_calls %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' + tc.function.arguments + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = [
    ("one_user_turn", None, [{"role": "user", "content": "Hi!"}]),
    ("system_and_turns", None, [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Answer in  one   word.\n"},
    ]),
    ("non_english", None, [
        {"role": "user", "content": "Écris un poème sur la mer 🌊, s'il te plaît."},
    ]),
    ("special_text_in_content", None, [
        {"role": "user", "content": "Print <|im_end|> then <|im_start|>system literally."},
    ]),
    ("tools", TOOLS_TEMPLATE, [
        {"role": "system", "content": "You help with travel."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 4, \"sky\": \"fog\"}"},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]),
]


def is_eog(llm, tok):
    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok))


def token_text(llm, tok):
    return llm.detokenize([tok], special=True).decode("utf-8", errors="replace")


def chats(llm):
    """llama-cpp-python's Jinja rendering of each conversation, and its ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    own = llm.metadata.get("tokenizer.chat_template")
    bos, eos = token_text(llm, llm.token_bos()), token_text(llm, llm.token_eos())
    out = []
    for name, template, messages in CONVERSATIONS:
        template = template or own
        if template is None:
            continue
        tools = [WEATHER_TOOL] if template is TOOLS_TEMPLATE else None
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        text = fmt(messages=messages, tools=tools).prompt
        out.append({
            "name": name,
            "template": None if template is own else template,
            "messages": messages,
            "tools": tools,
            "text": text,
            "ids": llm.tokenize(text.encode(), add_bos=False, special=True),
        })
    return out


def main():
    model_path, out_path = sys.argv[1], sys.argv[2]
    sha = hashlib.sha256(open(model_path, "rb").read()).hexdigest()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_threads=2, verbose=False, seed=0, logits_all=True)
    arch = llm.metadata["general.architecture"]
    prompts = []
    for name, text, special in PROMPTS + [("chat", CHAT_PROMPTS[arch], True)]:
        ids = llm.tokenize(text.encode(), add_bos=not special, special=special)
        llm.reset()
        llm.eval(ids)
        greedy, gaps, top5 = [], [], []
        for _ in range(GEN_TOKENS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits, kind="stable")
            tok = int(order[0])
            greedy.append(tok)
            gaps.append(float(logits[order[0]] - logits[order[1]]))
            top5.append([[int(t), round(float(logits[t]), 4)] for t in order[:5]])
            if is_eog(llm, tok):
                break
            llm.eval([tok])
        prompts.append({
            "name": name,
            "text": text,
            "parse_special": special,
            "ids": ids,
            "greedy": greedy,
            "top2_gap": gaps,
            "top5": top5,
            "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
        })
        print(name, len(ids), "tokens ->", repr(prompts[-1]["greedy_text"][:60]), file=sys.stderr)
    toks = []
    for text in TOKENIZER_TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        toks.append({"text": text, "ids": ids, "decoded": llm.detokenize(ids).decode("utf-8", errors="replace")})
    out = {
        "generator": "scripts/make_llamacpp_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_sha256": sha,
        "architecture": arch,
        "n_threads": 2,
        "stop_tokens": sorted(t for t in range(llm.n_vocab()) if is_eog(llm, t)),
        "prompts": prompts,
        "tokenizer": toks,
        "chats": chats(llm),
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
