#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) on one agent's turns, as `weft-bench agents
--single` wrote them: each turn's prompt token ids in order, 32 greedy
tokens each. llama-cpp-python keeps the tokens it evaluated and reuses the
longest common prefix with the next prompt, as llama.cpp's server keeps a
slot's prompt. Prints one JSON object: each turn's time to first token.

Usage: python3 bench/llamacpp_agents.py MODEL.gguf TURNS.json THREADS [ANSWER]
"""
import json
import sys
import time

import llama_cpp


def main():
    path, turns_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    answer = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    turns = json.load(open(turns_path))
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=8192,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ttft = []
    for prompt in turns:
        t = time.perf_counter()
        first = None
        for _ in llm.create_completion(
            prompt=prompt, max_tokens=answer, temperature=0.0, stream=True
        ):
            if first is None:
                first = (time.perf_counter() - t) * 1e3
        ttft.append(first)
    print(json.dumps({"engine": "llama.cpp", "threads": threads, "ttft_ms": ttft,
                      "prompt_tokens": [len(p) for p in turns]}))


if __name__ == "__main__":
    main()
