// agr CUDA prelude: the types and helpers every generated optimizer uses.
// Generated kernels are this file followed by the spec's own code.
#ifndef AGR_PRELUDE_CUH
#define AGR_PRELUDE_CUH

#ifdef AGR_HOST_CHECK
// Compiled as host C++ to run the generated kernels on the CPU, one block at
// a time with one thread per block, so a machine without a GPU can check
// their arithmetic and their bookkeeping (chunks, partials, counters).
#include <math.h>
#include <string.h>
#define AGR_HD static inline
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(n)
struct AgrDim { unsigned x; };
// Per host thread: optimizers may step on several threads at once.
static thread_local AgrDim threadIdx = {0};
static thread_local AgrDim blockIdx = {0};
static inline void __syncthreads() {}
static inline void __threadfence() {}
static inline unsigned atomicAdd(unsigned* a, unsigned v) { unsigned old = *a; *a += v; return old; }
static inline double __longlong_as_double(unsigned long long x) { double d; memcpy(&d, &x, 8); return d; }
struct float4 { float x, y, z, w; };
#else
#define AGR_HD __host__ __device__ __forceinline__
#endif

// Storage types, chosen by the host when it compiles the kernels: the
// parameter and gradient (AGR_P_T, AGR_G_T) and each per-element state k
// (AGR_S<k>_T) are float (the default), __half or __nv_bfloat16. Arithmetic
// is always f32 and host scalars f64; only loads and stores convert.
#ifndef AGR_P_T
#define AGR_P_T float
#endif
#ifndef AGR_G_T
#define AGR_G_T float
#endif
#ifndef AGR_S0_T
#define AGR_S0_T float
#endif
#ifndef AGR_S1_T
#define AGR_S1_T float
#endif
#ifndef AGR_S2_T
#define AGR_S2_T float
#endif
#ifndef AGR_S3_T
#define AGR_S3_T float
#endif
#ifndef AGR_S4_T
#define AGR_S4_T float
#endif
#ifndef AGR_S5_T
#define AGR_S5_T float
#endif
#ifndef AGR_S6_T
#define AGR_S6_T float
#endif
#ifndef AGR_S7_T
#define AGR_S7_T float
#endif
#ifdef AGR_HOST_CHECK
// On the host the 16-bit types are their bits; the conversions below are
// the CPU engine's, bit for bit.
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
#else
#if defined(AGR_USE_HALF)
#include <cuda_fp16.h>
#endif
#if defined(AGR_USE_BF16)
#include <cuda_bf16.h>
#endif
#endif

#define AGR_MAX_STATES 8
// Threads per block (a power of two). The host builds chunks of at most
// AGR_CHUNK elements, a multiple of 4 so that only a tensor's last chunk can
// have a ragged length.
#ifdef AGR_HOST_CHECK
#define AGR_BLOCK 1
#else
#define AGR_BLOCK 256
#endif
#define AGR_CHUNK 8192

// One parameter tensor of a multi-tensor launch. Layout shared with the Rust
// runtime (`#[repr(C)]`).
struct AgrTensor {
    AGR_P_T* p;
    const AGR_G_T* g;
    float* st[AGR_MAX_STATES];
    long long numel;
    long long ndim;
    double t;          // steps issued to this tensor, this one included
    int first_chunk;   // index of its first chunk in the chunk table
    int n_chunks;
    int group;         // its parameter group: the index of its hyperparameters
    double* rows;      // row-reduction results, ROW_REDUCTIONS per row
    long long row_len; // elements per row (every dimension but the first)
    // Steps of this tensor the update kernel skipped on the device (a
    // non-finite gradient); null: none. Its step count is t - *skips, so
    // the host never has to read the skip decision back.
    unsigned* skips;
    // The tensor as matrices over its last two dimensions: rows (the
    // second-to-last dimension, 1 below two dimensions) and columns (the
    // last, 1 for a scalar).
    long long view_rows;
    long long view_cols;
    // Sharded steps: the element where this rank's per-element state
    // buffers (and, with a reduce-scatter, its gradient) begin, and the row
    // where its row results begin; 0 otherwise.
    long long st_off;
    long long g_off;
    long long rows_off;
    // bf16/f16 parameters: their f32 master copy, stepped in their place
    // and rounded into them (null: the parameter itself is widened).
    float* master;
    // Stochastic rounding of bf16/f16 parameters (sr = 0: to nearest): the
    // random bits of element e hash (seed, step, param, e), where the step
    // is sr_step less the steps the device skipped (*sr_skipped), as on the
    // CPU.
    unsigned long long sr_seed;
    long long sr_step;
    const unsigned* sr_skipped;
    long long sr_param;
    long long sr;
};

__device__ __forceinline__ double agr_tensor_step(const AgrTensor& T) {
    return T.skips ? T.t - (double)*T.skips : T.t;
}

// One block's share of the work: `len` elements of `tensor` from `start`
// (whole rows when the optimizer has row reductions).
struct AgrChunk {
    int tensor;
    int len;
    long long start;
};

AGR_HD float agr_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x * 0.0f); }
AGR_HD double agr_sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x * 0.0); }

// Folds of a reduction: sum, or max with NaN winning (a NaN is never hidden).
AGR_HD double agr_fold(double a, double b, bool is_max) {
    if (!is_max) return a + b;
    if (a != a || b != b) return a + b;  // NaN
    return a > b ? a : b;
}
#ifdef AGR_HOST_CHECK
#define AGR_NEG_INF (-INFINITY)
#else
#define AGR_NEG_INF __longlong_as_double(0xfff0000000000000ull)
#endif
AGR_HD double agr_identity(bool is_max) { return is_max ? AGR_NEG_INF : 0.0; }

// ---- Storage conversions (see the engine's `precision` module) ----
AGR_HD unsigned agr_f32_bits(float x) {
    union { float f; unsigned u; } c;
    c.f = x;
    return c.u;
}
AGR_HD float agr_bits_f32(unsigned u) {
    union { float f; unsigned u; } c;
    c.u = u;
    return c.f;
}
// bf16: round to nearest even; a NaN keeps its sign and becomes quiet.
AGR_HD unsigned short agr_bf16_rn(float v) {
    const unsigned b = agr_f32_bits(v);
    if (v != v) return (unsigned short)((b >> 16) | 0x0040u);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
// f16: round to nearest even (IEEE; the `half` crate's conversion).
AGR_HD unsigned short agr_f16_rn(float value) {
    const unsigned x = agr_f32_bits(value);
    const unsigned sign = x & 0x80000000u, exp = x & 0x7F800000u, man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        const unsigned nan_bit = man == 0 ? 0u : 0x0200u;
        return (unsigned short)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    const unsigned half_sign = sign >> 16;
    const int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (unsigned short)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (unsigned short)half_sign;
        const unsigned m = man | 0x00800000u;
        unsigned half_man = m >> (14 - half_exp);
        const unsigned round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (unsigned short)(half_sign | half_man);
    }
    const unsigned out = half_sign | ((unsigned)half_exp << 10) | (man >> 13);
    const unsigned round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) return (unsigned short)(out + 1u);
    return (unsigned short)out;
}
// f16 to f32, exactly.
AGR_HD float agr_f16_f32(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1Fu, man = h & 0x03FFu;
    if (exp == 0x1Fu) return agr_bits_f32(sign | 0x7F800000u | (man << 13) | (man ? 0x00400000u : 0u));
    if (exp == 0) {
        const float mag = (float)man * 5.9604644775390625e-08f;  // 2^-24, exact
        return sign ? -mag : mag;
    }
    return agr_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// splitmix64's finaliser, and the random bits of stochastic rounding.
AGR_HD unsigned long long agr_mix(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
AGR_HD unsigned long long agr_noise_key(unsigned long long seed, unsigned long long step,
                                        unsigned long long param) {
    unsigned long long x = seed ^ 0x243F6A8885A308D3ull;
    x = agr_mix(x ^ (step * 0x9E3779B97F4A7C15ull));
    return agr_mix(x ^ (param * 0xC2B2AE3D27D4EB4Full));
}
// bf16 stochastic rounding with 16 random bits r (torchao's rule).
AGR_HD unsigned short agr_bf16_sr(float x, unsigned r) {
    const unsigned bits = agr_f32_bits(x);
    if ((bits & 0x7F800000u) == 0x7F800000u) return agr_bf16_rn(x);
    const unsigned down = bits & 0xFFFF0000u;
    return (unsigned short)(((r & 0xFFFFu) < (bits & 0xFFFFu) ? down + 0x10000u : down) >> 16);
}
// f16 stochastic rounding with a uniform u in [0, 1): the upper neighbour
// with probability (x - lo) / (hi - lo).
AGR_HD unsigned short agr_f16_sr(float x, double u) {
    const unsigned short near = agr_f16_rn(x);
    const float back = agr_f16_f32(near);
    const bool finite = (agr_f32_bits(x) & 0x7F800000u) != 0x7F800000u;
    const bool back_finite = (agr_f32_bits(back) & 0x7F800000u) != 0x7F800000u;
    if (!finite || !back_finite || back == x) return near;
    const bool away = fabsf(back) < fabsf(x);
    int mag = (int)(near & 0x7FFFu) + (away ? 1 : -1);
    if ((near & 0x7FFFu) == 0 && !away) mag = 1;
    const unsigned short other = (unsigned short)((x < 0.0f ? 0x8000u : 0u) | (unsigned)mag);
    const unsigned short lo = back < x ? near : other, hi = back < x ? other : near;
    const double l = (double)agr_f16_f32(lo), h = (double)agr_f16_f32(hi);
    return u < ((double)x - l) / (h - l) ? hi : lo;
}

// How a step rounds its parameters: nearest, or stochastically under the
// key of (seed, step, parameter); e = base + i is the element's index.
struct AgrRound {
    bool sr;
    unsigned long long key;
    long long base;
};
__device__ __forceinline__ AgrRound agr_round(const AgrTensor& T, long long base) {
    AgrRound r = {T.sr != 0, 0ull, base};
    if (r.sr) {
        const unsigned long long skipped = T.sr_skipped ? (unsigned long long)*T.sr_skipped : 0ull;
        r.key = agr_noise_key(T.sr_seed, (unsigned long long)T.sr_step - skipped,
                              (unsigned long long)T.sr_param);
    }
    return r;
}

__device__ __forceinline__ float agr_ld(float x) { return x; }
__device__ __forceinline__ void agr_st(float* at, float v) { *at = v; }
__device__ __forceinline__ void agr_st_rounded(float* at, float v, const AgrRound&, long long) { *at = v; }
#ifdef AGR_HOST_CHECK
inline float agr_ld(__half x) { return agr_f16_f32(x.x); }
inline void agr_st(__half* at, float v) { at->x = agr_f16_rn(v); }
inline float agr_ld(__nv_bfloat16 x) { return agr_bits_f32((unsigned)x.x << 16); }
inline void agr_st(__nv_bfloat16* at, float v) { at->x = agr_bf16_rn(v); }
inline void agr_st_bits(__half* at, unsigned short b) { at->x = b; }
inline void agr_st_bits(__nv_bfloat16* at, unsigned short b) { at->x = b; }
#define AGR_HAS_HALF 1
#define AGR_HAS_BF16 1
#else
#ifdef AGR_USE_HALF
__device__ __forceinline__ float agr_ld(__half x) { return __half2float(x); }
__device__ __forceinline__ void agr_st(__half* at, float v) { *at = __float2half_rn(v); }
__device__ __forceinline__ void agr_st_bits(__half* at, unsigned short b) { *at = __ushort_as_half(b); }
#define AGR_HAS_HALF 1
#endif
#ifdef AGR_USE_BF16
__device__ __forceinline__ float agr_ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void agr_st(__nv_bfloat16* at, float v) { *at = __float2bfloat16_rn(v); }
__device__ __forceinline__ void agr_st_bits(__nv_bfloat16* at, unsigned short b) { *at = __ushort_as_bfloat16(b); }
#define AGR_HAS_BF16 1
#endif
#endif
#ifdef AGR_HAS_HALF
__device__ __forceinline__ void agr_st_rounded(__half* at, float v, const AgrRound& r, long long i) {
    if (!r.sr) return agr_st(at, v);
    const unsigned long long n = agr_mix(r.key ^ (unsigned long long)(r.base + i));
    agr_st_bits(at, agr_f16_sr(v, (double)(n >> 11) * (1.0 / 9007199254740992.0)));
}
#endif
#ifdef AGR_HAS_BF16
__device__ __forceinline__ void agr_st_rounded(__nv_bfloat16* at, float v, const AgrRound& r, long long i) {
    if (!r.sr) return agr_st(at, v);
    agr_st_bits(at, agr_bf16_sr(v, (unsigned)(agr_mix(r.key ^ (unsigned long long)(r.base + i)) & 0xFFFFull)));
}
#endif

// The parameter's element i as the kernels step it: its master copy M
// where it has one, else the parameter widened; and its new value stored
// into both, the parameter rounded as the step says.
template <class P>
__device__ __forceinline__ float agr_ld_param(const P* p, const float* m, int i) {
    return m ? m[i] : agr_ld(p[i]);
}
template <class P>
__device__ __forceinline__ void agr_st_param(P* p, float* m, int i, float v, const AgrRound& r) {
    if (m) m[i] = v;
    agr_st_rounded(&p[i], v, r, i);
}

// Whether a buffer holds f32 (the 128-bit path handles f32 only).
__device__ __forceinline__ bool agr_is_f32(const float*) { return true; }
template <class T> __device__ __forceinline__ bool agr_is_f32(const T*) { return false; }

// Lane k of a float4.
__device__ __forceinline__ float& agr_lane(float4& v, int k) { return (&v.x)[k]; }

// 128-bit accesses need 16-byte alignment; `len` is a multiple of 4 except
// in a tensor's last chunk, whose tail is done element by element.
__device__ __forceinline__ bool agr_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Folds one value per thread into one per block, in a fixed tree order.
__device__ __forceinline__ double agr_block_fold(double v, bool is_max, double* sm) {
    sm[threadIdx.x] = v;
    __syncthreads();
    for (int s = AGR_BLOCK / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sm[threadIdx.x] = agr_fold(sm[threadIdx.x], sm[threadIdx.x + s], is_max);
        __syncthreads();
    }
    double r = sm[0];
    __syncthreads();
    return r;
}

// Folds tensor `tensor`'s chunk partials (in a fixed pattern) into
// `reduced`; where the pass has global reductions, the last tensor to
// finish (an integer atomic ticket: it decides only *who* folds) folds the
// tensors' results into `global` the same way. Counters are left at zero.
template <int NR>
__device__ void agr_fold_tensor(const int (&ids)[NR], const bool (&is_max)[NR],
                                const bool (&is_global)[NR], int nrt, int tensor, const AgrTensor& T,
                                int ntensors, double* partials, double* reduced, double* global,
                                unsigned* counters, double* sm) {
    __threadfence();
    const volatile double* vp = partials;
    bool any_global = false;
#pragma unroll
    for (int k = 0; k < NR; ++k) {
        double x = agr_identity(is_max[k]);
        for (int j = (int)threadIdx.x; j < T.n_chunks; j += AGR_BLOCK)
            x = agr_fold(x, vp[(size_t)(T.first_chunk + j) * nrt + ids[k]], is_max[k]);
        x = agr_block_fold(x, is_max[k], sm);
        if (threadIdx.x == 0) reduced[(size_t)tensor * nrt + ids[k]] = x;
        any_global |= is_global[k];
    }
    if (!any_global) {
        if (threadIdx.x == 0) counters[tensor] = 0;
        return;
    }
    __shared__ bool last_tensor;
    if (threadIdx.x == 0) {
        counters[tensor] = 0;
        __threadfence();
        unsigned ticket = atomicAdd(&counters[ntensors], 1u);
        last_tensor = ticket == (unsigned)ntensors - 1u;
    }
    __syncthreads();
    if (!last_tensor) return;
    __threadfence();
    const volatile double* vr = reduced;
#pragma unroll
    for (int k = 0; k < NR; ++k) {
        if (!is_global[k]) continue;
        double x = agr_identity(is_max[k]);
        for (int j = (int)threadIdx.x; j < ntensors; j += AGR_BLOCK)
            x = agr_fold(x, vr[(size_t)j * nrt + ids[k]], is_max[k]);
        x = agr_block_fold(x, is_max[k], sm);
        if (threadIdx.x == 0) global[ids[k]] = x;
    }
    if (threadIdx.x == 0) counters[ntensors] = 0;
}

// Finishes the reductions of one pass, deterministically and in one launch:
// each block folds its threads' partials in a fixed tree and stores them per
// chunk; the last block of a tensor to finish (found with an integer atomic
// ticket, which decides only *who* combines, never the order) folds that
// tensor's chunk partials (see agr_fold_tensor). Without counters (a
// sharded step's first launch) the partials are stored and nothing is
// folded: the host gathers every rank's, and a second launch without a
// chunk table folds them (agr_fold_only), in the same pattern.
template <int NR>
__device__ void agr_finish(const double (&acc)[NR], const int (&ids)[NR], const bool (&is_max)[NR],
                           const bool (&is_global)[NR], int nrt, const AgrChunk& c, const AgrTensor& T,
                           int ntensors, double* partials, double* reduced, double* global,
                           unsigned* counters) {
    __shared__ double sm[AGR_BLOCK];
    __shared__ bool last;
    double v[NR];
#pragma unroll
    for (int k = 0; k < NR; ++k) v[k] = agr_block_fold(acc[k], is_max[k], sm);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < NR; ++k) partials[(size_t)blockIdx.x * nrt + ids[k]] = v[k];
    }
    if (counters == 0) return;
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned ticket = atomicAdd(&counters[c.tensor], 1u);
        last = ticket == (unsigned)T.n_chunks - 1u;
    }
    __syncthreads();
    if (!last) return;
    agr_fold_tensor<NR>(ids, is_max, is_global, nrt, c.tensor, T, ntensors, partials, reduced, global,
                        counters, sm);
}

// A sharded step's second launch of a reduction pass: one block per tensor
// folds the gathered chunk partials as agr_finish's last block would.
template <int NR>
__device__ void agr_fold_only(const int (&ids)[NR], const bool (&is_max)[NR],
                              const bool (&is_global)[NR], int nrt, const AgrTensor* tensors,
                              int ntensors, double* partials, double* reduced, double* global,
                              unsigned* counters) {
    __shared__ double sm[AGR_BLOCK];
    const int tensor = (int)blockIdx.x;
    if (tensor >= ntensors) return;
    agr_fold_tensor<NR>(ids, is_max, is_global, nrt, tensor, tensors[tensor], ntensors, partials,
                        reduced, global, counters, sm);
}

#endif  // AGR_PRELUDE_CUH
