// Runs the WKV-7 CUDA kernels (rwkv_diffusion_rnn/models/csrc/wkv7_cuda.cu) as host C++ for the tests: a block is
// its threads as std::threads, __syncthreads a std::barrier, a warp shuffle a store-barrier-load-barrier through a
// per-thread slot (every thread of a block reaches each shuffle, as the kernels guarantee), __shared__ arrays
// function statics (blocks run one after another). Build: g++ -std=c++20 -shared -fPIC -pthread -I<csrc> this.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even (finite values)
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}
inline float __expf(float x) { return expf(x); }
using std::min;

struct Dim3 {
    int x;
};
namespace host {
thread_local Dim3 thread_idx{0}, block_idx{0};
std::barrier<>* bar = nullptr;
float* slots = nullptr;
int bwd_blocks = 0;  // the backward's grid when larger than B H (host_set_bwd_blocks: the padded grid's blocks)
}  // namespace host
#define threadIdx (host::thread_idx)
#define blockIdx (host::block_idx)
inline void __syncthreads() { host::bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
    const int t = threadIdx.x;
    host::slots[t] = v;
    host::bar->arrive_and_wait();
    const float o = host::slots[t ^ off];
    host::bar->arrive_and_wait();
    return o;
}

#define WKV7_HOST_EMULATION
#include "wkv7_cuda.cu"

template <class F>
void launch(int blocks, int threads, F body) {
    std::vector<float> slots(threads);
    host::slots = slots.data();
    for (int b = 0; b < blocks; ++b) {
        std::barrier<> bar(threads);
        host::bar = &bar;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
            ts.emplace_back([=] {
                host::thread_idx.x = t;
                host::block_idx.x = b;
                body();
            });
        for (auto& th : ts) th.join();
    }
}

template <typename T, typename TW, int P>
void fwd(int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v, const void* a,
         const void* b, void* o, float* sa, float* ckpt, int save) {
    launch(B * H, N * P, [&] {
        wkv7_fwd_kernel<T, TW, P>(Tn, H, (const T*)r, (const TW*)w, (const T*)k, (const T*)v, (const T*)a,
                                  (const T*)b, (T*)o, sa, ckpt, save);
    });
}

template <typename T, typename TW, int P>
void bwd(int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v, const void* a,
         const void* b, const void* dout, const float* sa, const float* ckpt, const float* dht, void* dr, void* dw,
         void* dk, void* dv, void* da, void* db) {
    launch(std::max(B * H, host::bwd_blocks), N * P, [&] {
        wkv7_bwd_kernel<T, TW, P>(B * H, Tn, H, (const T*)r, (const TW*)w, (const T*)k, (const T*)v, (const T*)a,
                                  (const T*)b, (const T*)dout, sa, ckpt, dht, (T*)dr, (TW*)dw, (T*)dk, (T*)dv,
                                  (T*)da, (T*)db);
    });
}

// the dtype / split combinations the tests run
#define WKV7_DISPATCH(fn, ...)                                                                  \
    if (x_dtype == 0 && w_dtype == 0 && split == 1) return fn<float, float, 1>(__VA_ARGS__), 0; \
    if (x_dtype == 0 && w_dtype == 0 && split == 2) return fn<float, float, 2>(__VA_ARGS__), 0; \
    if (x_dtype == 0 && w_dtype == 0 && split == 4) return fn<float, float, 4>(__VA_ARGS__), 0; \
    if (x_dtype == 1 && w_dtype == 0 && split == 2) return fn<__nv_bfloat16, float, 2>(__VA_ARGS__), 0; \
    if (x_dtype == 1 && w_dtype == 1 && split == 1) return fn<__nv_bfloat16, __nv_bfloat16, 1>(__VA_ARGS__), 0; \
    return -1;

extern "C" int host_forward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r,
                            const void* w, const void* k, const void* v, const void* a, const void* b, void* o,
                            float* sa, float* ckpt, int save) {
    WKV7_DISPATCH(fwd, B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save)
}

extern "C" int host_backward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r,
                             const void* w, const void* k, const void* v, const void* a, const void* b,
                             const void* dout, const float* sa, const float* ckpt, const float* dht, void* dr,
                             void* dw, void* dk, void* dv, void* da, void* db) {
    WKV7_DISPATCH(bwd, B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw, dk, dv, da, db)
}

// the backward launched with ``blocks`` blocks when that exceeds B H (0: B H), as the padded grid launches it
extern "C" void host_set_bwd_blocks(int blocks) { host::bwd_blocks = blocks; }

extern "C" int host_padded_grid(int bh, int sms, int per_sm) { return padded_grid(bh, sms, per_sm); }
