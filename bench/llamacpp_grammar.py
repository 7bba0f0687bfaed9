#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) on `weft-bench grammar`'s measurements, as
far as it has them: single-sequence decode tokens/s under the same JSON
Schema (llama.cpp's GBNF from `LlamaGrammar.from_json_schema`) against the
same prompt free, and the compile time of the same test schemas. It runs
one sequence at a time (no batched grammar decoding). Prints one JSON object.

Usage: python3 bench/llamacpp_grammar.py MODEL.gguf THREADS TOKENS SCHEMAS.json LONG_SCHEMA.json
"""
import json
import statistics
import sys
import time

import llama_cpp
from llama_cpp import Llama, LlamaGrammar


def main():
    path, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    schemas = json.load(open(sys.argv[4]))
    long_schema = open(sys.argv[5]).read()
    llm = Llama(model_path=path, n_threads=threads, n_ctx=2048, verbose=False)
    eos = llm.token_eos()
    compile_ms, failed = [], []
    for name, schema in schemas.items():
        t = time.perf_counter()
        try:
            LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            compile_ms.append((time.perf_counter() - t) * 1e3)
        except Exception as e:  # a schema its converter refuses
            failed.append(f"{name}: {e}"[:120])
    grammar = LlamaGrammar.from_json_schema(long_schema, verbose=False)
    prompt = "Give a list of records as JSON:\n"

    def rate(g):
        # the end-of-text token banned, so both runs generate `tokens`
        t = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=tokens, temperature=0, grammar=g,
                                  logit_bias={eos: -1e9})
        n = r["usage"]["completion_tokens"]
        return n / (time.perf_counter() - t)

    rate(None)  # warm-up
    free, held = [], []
    for _ in range(3):
        free.append(rate(None))
        held.append(rate(grammar))
    f, c = statistics.median(free), statistics.median(held)
    s = sorted(compile_ms)
    print(json.dumps({
        "engine": "llama.cpp", "version": llama_cpp.__version__, "threads": threads, "tokens": tokens,
        "compile_ms": {"schemas": len(s), "p50": s[len(s) // 2] if s else None, "max": s[-1] if s else None,
                       "refused": failed},
        "decode": [{"sequences": 1, "free_tokens_per_s": f, "constrained_tokens_per_s": c, "ratio": c / f}],
    }))


if __name__ == "__main__":
    main()
