// The Gemma 3 forward's kernels (see cuda/model.rs), compiled at run time
// with NVRTC together with elementwise.cu. Activations are row-major f32;
// weights are bf16 and the KV cache f16, both held as 16-bit patterns and
// converted here, so no CUDA header is needed.

#define KV_BLOCK 16  // positions per KV block: kv::KV_BLOCK_TOKENS

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

// Sum of v over the block (blockDim.x a power of two, at most 1024);
// `sh` holds blockDim.x floats. Every thread gets the sum.
__device__ float block_sum(float v, float *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    float total = sh[0];
    __syncthreads();
    return total;
}

// out[r] = embedding[tokens[r]] * scale; one block per row.
extern "C" __global__ void embed_rows(const unsigned short *table, const unsigned int *tokens,
                                      float *out, int hidden, float scale) {
    const unsigned short *src = table + (size_t)tokens[blockIdx.x] * hidden;
    float *dst = out + (size_t)blockIdx.x * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = bf16_to_f32(src[c]) * scale;
}

// out[r] = (accumulate ? out[r] : 0) + x[r] / rms(x[r]) * w; one block per
// row. `out` may be `x` (with accumulate 0).
extern "C" __global__ void rms_norm_rows(const float *x, float *out, const float *w, int cols,
                                         float eps, int accumulate) {
    extern __shared__ float sh[];
    const float *row = x + (size_t)blockIdx.x * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += row[c] * row[c];
    float scale = rsqrtf(block_sum(ss, sh) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = row[c] * scale * w[c];
        dst[c] = accumulate ? dst[c] + v : v;
    }
}

// Per head of every row: RMS norm with w (head_dim values), NeoX rotation
// by the row's position (element i pairs with i + head_dim/2, angle
// pos * freq_scale^i), then a scale. One block per (row, head).
extern "C" __global__ void qk_norm_rope(float *x, const float *w, const int *pos, int heads,
                                        int head_dim, float eps, float freq_scale,
                                        float post_scale) {
    extern __shared__ float sh[];
    int row = blockIdx.x / heads;
    float *v = x + (size_t)blockIdx.x * head_dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) ss += v[c] * v[c];
    float inv = rsqrtf(block_sum(ss, sh) / head_dim + eps);
    int half = head_dim / 2;
    float p = (float)pos[row];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        // the angle as the CPU forms it: p, then times freq_scale per step
        float theta = p;
        for (int j = 0; j < i; j++) theta *= freq_scale;
        float sn, cs;
        sincosf(theta, &sn, &cs);
        float a = v[i] * inv * w[i];
        float b = v[i + half] * inv * w[i + half];
        v[i] = (a * cs - b * sn) * post_scale;
        v[i + half] = (b * cs + a * sn) * post_scale;
    }
}

// Stores each row's key and value (f16) at its cache slot; one block per row.
extern "C" __global__ void kv_store(const float *k, const float *v, unsigned short *kc,
                                    unsigned short *vc, const int *slots, int kv_dim) {
    size_t src = (size_t)blockIdx.x * kv_dim;
    size_t dst = (size_t)slots[blockIdx.x] * kv_dim;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kc[dst + c] = f32_to_f16(k[src + c]);
        vc[dst + c] = f32_to_f16(v[src + c]);
    }
}

// Causal attention over the paged cache, one warp per (row, query head):
// the row sees its sequence's positions lo..=pos (lo from the sliding
// window; window 0: none), through its chunk's block table. Online
// softmax; the query meets the f16 keys as f16, as on the CPU. head_dim is
// a multiple of 32, at most 512.
extern "C" __global__ void attention(const float *q, const unsigned short *kc,
                                     const unsigned short *vc, float *out, const int *pos,
                                     const int *row_chunk, const int *tables, int max_blocks,
                                     int rows, int heads, int kv_heads, int head_dim,
                                     int window) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= rows * heads) return;
    int row = warp / heads;
    int head = warp % heads;
    int g = head / (heads / kv_heads);
    int kv_dim = kv_heads * head_dim;
    int per = head_dim / 32;
    float qv[16], acc[16];
    const float *qr = q + ((size_t)row * heads + head) * head_dim;
    for (int j = 0; j < per; j++) {
        qv[j] = round_f16(qr[j * 32 + lane]);
        acc[j] = 0.0f;
    }
    int p = pos[row];
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    const int *table = tables + (size_t)row_chunk[row] * max_blocks;
    float m = -3.0e38f, l = 0.0f;
    for (int s = lo; s <= p; s++) {
        size_t base = ((size_t)table[s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK) * kv_dim + g * head_dim;
        float dot = 0.0f;
        for (int j = 0; j < per; j++) dot += qv[j] * f16_to_f32(kc[base + j * 32 + lane]);
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float mn = fmaxf(m, dot);
        float c = expf(m - mn);
        float e = expf(dot - mn);
        l = l * c + e;
        for (int j = 0; j < per; j++) acc[j] = acc[j] * c + e * f16_to_f32(vc[base + j * 32 + lane]);
        m = mn;
    }
    float *o = out + ((size_t)row * heads + head) * head_dim;
    for (int j = 0; j < per; j++) o[j * 32 + lane] = acc[j] / l;
}

// gate = gelu(gate) * up, GELU with the tanh approximation taken as ggml's
// CPU backend does: input and output rounded to f16, exact outside ±10.
extern "C" __global__ void gelu_mul(float *gate, const float *up, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = gate[i];
    float g;
    if (x <= -10.0f) {
        g = 0.0f;
    } else if (x >= 10.0f) {
        g = x;
    } else {
        float h = round_f16(x);
        g = round_f16(0.5f * h * (1.0f + tanhf(0.7978845608028654f * h * (1.0f + 0.044715f * h * h))));
    }
    gate[i] = g * up[i];
}

// y = bf16(x), the GEMMs' input.
extern "C" __global__ void to_bf16(const float *x, unsigned short *y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_bf16(x[i]);
}

// out[i] = x[rows[i]]; one block per gathered row.
extern "C" __global__ void gather_rows(const float *x, const int *rows, float *out, int cols) {
    const float *src = x + (size_t)rows[blockIdx.x] * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// An order-preserving key of a float: larger value, larger key.
__device__ __forceinline__ unsigned int order_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// For each row of x (one block of 256 threads per row): its largest value,
// the sum over the row of exp((x - max) * inv_t[row]), and every (index,
// value) at or above the row's k-th largest value, at most `cap` of them in
// any order. The k-th largest is found by radix select on the order keys,
// 8 bits a pass. What the host sampler needs to draw a top-k / top-p /
// min-p token without the whole row (sampling::TopOfRow).
extern "C" __global__ void top_of_rows(const float *x, int cols, int k, int cap,
                                       const float *inv_t, float *out_vals,
                                       unsigned int *out_idx, unsigned int *out_count,
                                       float *out_max, float *out_total) {
    __shared__ float sh[256];
    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_mask, s_need, s_count;
    const float *row = x + (size_t)blockIdx.x * cols;
    int tid = threadIdx.x;
    float m = -3.0e38f;
    for (int c = tid; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    sh[tid] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] = fmaxf(sh[tid], sh[tid + s]);
        __syncthreads();
    }
    float mx = sh[0];
    __syncthreads();
    float it = inv_t[blockIdx.x];
    float sum = 0.0f;
    for (int c = tid; c < cols; c += blockDim.x) sum += expf((row[c] - mx) * it);
    float total = block_sum(sum, sh);
    if (tid == 0) {
        s_prefix = 0;
        s_mask = 0;
        s_need = (unsigned int)min(k, cols);
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        unsigned int prefix = s_prefix, mask = s_mask;
        for (int c = tid; c < cols; c += blockDim.x) {
            unsigned int key = order_key(row[c]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            unsigned int need = s_need, cum = 0;
            int b = 255;
            for (; b > 0; b--) {
                if (cum + hist[b] >= need) break;
                cum += hist[b];
            }
            s_need = need - cum;
            s_prefix = prefix | ((unsigned int)b << shift);
            s_mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    unsigned int threshold = s_prefix;  // the k-th largest value's key
    if (tid == 0) s_count = 0;
    __syncthreads();
    size_t base = (size_t)blockIdx.x * cap;
    for (int c = tid; c < cols; c += blockDim.x) {
        float v = row[c];
        if (order_key(v) >= threshold) {
            unsigned int at = atomicAdd(&s_count, 1u);
            if (at < (unsigned int)cap) {
                out_vals[base + at] = v;
                out_idx[base + at] = (unsigned int)c;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        out_count[blockIdx.x] = min(s_count, (unsigned int)cap);
        out_max[blockIdx.x] = mx;
        out_total[blockIdx.x] = total;
    }
}
