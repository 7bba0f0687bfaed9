// weft's CUDA kernels, compiled at run time with NVRTC (see cuda/mod.rs).
// Row-major f32 throughout; one block per row where a row is reduced.

extern "C" __global__ void rms_norm(float *x, const float *w, int cols, float eps) {
    // one block per row; x[row] = x[row] / rms(x[row]) * w (GGUF norms hold 1 + w)
    extern __shared__ float partial[];
    float *row = x + (size_t)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = row[c];
        sum += v * v;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    float scale = rsqrtf(partial[0] / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        row[c] = row[c] * scale * w[c];
    }
}

extern "C" __global__ void gelu_tanh(float *x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        x[i] = 0.5f * v * (1.0f + tanhf(inner));
    }
}

extern "C" __global__ void argmax_rows(const float *x, int cols, unsigned int *out) {
    // one block per row; ties go to the lowest index, as on the CPU
    extern __shared__ unsigned char shared[];
    float *best = (float *)shared;
    unsigned int *at = (unsigned int *)(best + blockDim.x);
    const float *row = x + (size_t)blockIdx.x * cols;
    float b = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY)
    unsigned int a = 0xffffffffu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = row[c];
        if (v > b || (v == b && (unsigned int)c < a)) { b = v; a = c; }
    }
    best[threadIdx.x] = b;
    at[threadIdx.x] = a;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float o = best[threadIdx.x + s];
            unsigned int oa = at[threadIdx.x + s];
            if (o > best[threadIdx.x] || (o == best[threadIdx.x] && oa < at[threadIdx.x])) {
                best[threadIdx.x] = o;
                at[threadIdx.x] = oa;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = at[0];
}
