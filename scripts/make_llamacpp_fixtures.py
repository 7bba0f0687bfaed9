#!/usr/bin/env python3
"""Writes the llama.cpp reference fixtures the real-model tests compare against.

Usage: python3 scripts/make_llamacpp_fixtures.py MODEL.gguf OUT.json

Needs `pip install llama-cpp-python` (it builds llama.cpp from source, about
16 minutes on 2 cores). CI does not run this: it compares against the
committed JSON. For every prompt it records llama.cpp's token ids, its greedy
continuation, and at each generated position the gap between the two best
logits, and its five best tokens with their logits, so a test can tell a real
divergence from llama.cpp's own near-ties.
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

PROMPTS = [
    ("short", "The capital of France is", False),
    ("question", "Why is the sky blue? Explain briefly.", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("french", "Il était une fois, dans un petit village de Provence,", False),
    ("chinese", "人工智能的未来发展方向是", False),
    ("emoji", "My favourite emoji are 🚀 and 🌍 because", False),
    ("list", "Here is a list of five fruits:\n1.", False),
    ("long", LONG, False),
    ("chat", "<bos><start_of_turn>user\nWrite a haiku about autumn leaves.<end_of_turn>\n<start_of_turn>model\n", True),
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
]


def main():
    model_path, out_path = sys.argv[1], sys.argv[2]
    sha = hashlib.sha256(open(model_path, "rb").read()).hexdigest()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_threads=2, verbose=False, seed=0, logits_all=True)
    prompts = []
    for name, text, special in PROMPTS:
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
            if tok in (1, 106):
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
        "n_threads": 2,
        "prompts": prompts,
        "tokenizer": toks,
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
