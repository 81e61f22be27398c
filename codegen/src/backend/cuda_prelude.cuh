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

// Parameter and gradient element types: float (default), __half or __nv_bfloat16.
// Arithmetic is always f32, state is always f32, host scalars are f64.
#ifndef AGR_P_T
#define AGR_P_T float
#endif
#ifndef AGR_G_T
#define AGR_G_T float
#endif
#if defined(AGR_USE_HALF) && !defined(AGR_HOST_CHECK)
#include <cuda_fp16.h>
#endif
#if defined(AGR_USE_BF16) && !defined(AGR_HOST_CHECK)
#include <cuda_bf16.h>
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

__device__ __forceinline__ float agr_ld(float x) { return x; }
__device__ __forceinline__ void agr_st(float* at, float v) { *at = v; }
#ifdef AGR_USE_HALF
__device__ __forceinline__ float agr_ld(__half x) { return __half2float(x); }
__device__ __forceinline__ void agr_st(__half* at, float v) { *at = __float2half_rn(v); }
#endif
#ifdef AGR_USE_BF16
__device__ __forceinline__ float agr_ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void agr_st(__nv_bfloat16* at, float v) { *at = __float2bfloat16_rn(v); }
#endif

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
