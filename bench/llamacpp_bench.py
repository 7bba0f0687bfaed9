#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same measurements as
`weft-bench runtime`: load, prefill, single-sequence decode, aggregate decode
over N sequences in one batch, peak RSS. Prints one JSON object.

Usage: python3 bench/llamacpp_bench.py MODEL.gguf THREADS [PREFILLS] [DECODE] [BATCHES]
(PREFILLS and BATCHES are comma-separated: 512,2048 and 4,16,64 by default)
"""
import ctypes
import json
import resource
import sys
import time

import llama_cpp
import numpy as np


@llama_cpp.llama_log_callback
def LOG_NOTHING(level, text, user_data):
    pass


def prompt_tokens(n, salt):
    return [2] + [1000 + ((i * 7919 + salt * 104729) % 20000) for i in range(n - 1)]


def main():
    path, threads = sys.argv[1], int(sys.argv[2])
    prefills = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "512,2048").split(",")]
    decode_n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    batches = [int(x) for x in (sys.argv[5] if len(sys.argv) > 5 else "4,16,64").split(",")]
    max_seqs = max(batches)
    open(path, "rb").read()  # warm page cache
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(LOG_NOTHING, ctypes.c_void_p())
    t = time.perf_counter()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = max(8192, max(prefills) + 64, max_seqs * (16 + decode_n) + 64)
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = max_seqs
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    load_s = time.perf_counter() - t
    mem = llama_cpp.llama_get_memory(ctx)

    def clear():
        llama_cpp.llama_memory_clear(mem, True)

    batch = llama_cpp.llama_batch_init(max(512, max_seqs), 0, max_seqs)

    def decode(entries):
        # entries: (token, pos, seq, want_logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, lg) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if lg else 0
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def argmax(i):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        arr = (ctypes.c_float * n_vocab).from_address(ctypes.addressof(ptr.contents))
        return int(np.frombuffer(arr, dtype=np.float32).argmax())

    # prefill, in llama.cpp's 512-token batches
    # warm-up: one 512-token prompt, as weft-bench does, so neither engine's
    # first timed prompt pays for first-touching its buffers
    clear()
    decode([(t, p, 0, p == 511) for p, t in enumerate(prompt_tokens(512, 99))])
    prefill = []
    for prefill_n in prefills:
        clear()
        toks = prompt_tokens(prefill_n, 1)
        t = time.perf_counter()
        for s in range(0, len(toks), 512):
            chunk = toks[s:s + 512]
            decode([(tok, s + i, 0, s + i == len(toks) - 1) for i, tok in enumerate(chunk)])
        prefill.append([prefill_n, prefill_n / (time.perf_counter() - t)])

    def decode_rate(n, prompt, steps):
        clear()
        seqs = [prompt_tokens(prompt, i) for i in range(n)]
        entries = []
        for s, toks in enumerate(seqs):
            entries += [(tok, p, s, p == len(toks) - 1) for p, tok in enumerate(toks)]
        for c in range(0, len(entries), 512):
            decode(entries[c:c + 512])
        # logits index of each sequence's last prompt token within the last batch is messy: take argmax fresh
        last = [0] * n
        pos = [prompt] * n
        nxt = [1000 + s for s in range(n)]
        t = time.perf_counter()
        for _ in range(steps - 1):
            decode([(nxt[s], pos[s], s, True) for s in range(n)])
            for s in range(n):
                nxt[s] = argmax(s)
                pos[s] += 1
        return n * (steps - 1) / (time.perf_counter() - t)

    single = decode_rate(1, 16, decode_n * 2)
    agg = [[n, decode_rate(n, 16, decode_n)] for n in batches]
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "threads": threads,
        "load_s": load_s,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": single,
        "aggregate_decode_tokens_per_s": agg,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
