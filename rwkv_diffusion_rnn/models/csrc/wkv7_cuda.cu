// WKV-7 forward and backward for head size 64 (backend ``cuda`` of rwkv_diffusion_rnn/models/wkv7.py).
//
// Plain CUDA, no torch headers: wkv7_cuda.cpp holds the torch glue and calls the C-style launchers at the end.
// With WKV7_HOST_EMULATION defined the kernels compile as host C++ against a stand-in of the CUDA built-ins
// (tests/models/wkv7_cuda_host.cpp: threads, barriers, shuffles), which is how the tests run this code without a GPU.
//
// Layout and convention (those of wkv7_reference): operands x[b, t, h, n] contiguous, head size N = 64, state
// S[k, v] in fp32, ``w`` the LOG decay (d = exp(w)). One step, for key index i and value index j:
//
//     sa[j]   = sum_i a[i] S[i, j]                       (S = S_{t-1})
//     S'[i,j] = d[i] S[i, j] + b[i] sa[j] + k[i] v[j]    (S' = S_t)
//     o[j]    = sum_i r[i] S'[i, j]
//
// Gradients. Let G = dL/dS_t (everything downstream of S_t), do = dL/do_t. Walking t = T-1 .. 0, with G_T-1 the
// gradient of the final state (zero when the final state is not in the loss):
//
//     G       += r do^T                       (o_t = S_t^T r_t)
//     dr[i]    = sum_j S_t[i, j] do[j]
//     dk[i]    = sum_j G[i, j] v[j]           dv[j]  = sum_i G[i, j] k[i]
//     db[i]    = sum_j G[i, j] sa[j]          dsa[j] = sum_i G[i, j] b[i]
//     dw[i]    = d[i] sum_j G[i, j] S_{t-1}[i, j]       (dL/dd * dd/dw, dd/dw = d)
//     da[i]    = sum_j S_{t-1}[i, j] dsa[j]             (sa = S_{t-1}^T a)
//     G_{t-1}  = diag(d) G + a dsa^T                    (the two paths from S_{t-1} into S_t)
//
// Threads: one block per (batch, head) of 64 P threads, P = 1, 2 or 4 (``split``, chosen per launch): a group of P
// adjacent lanes owns one row or column of the state, each thread N / P of its elements, taken as float4 chunks
// interleaved over the group (chunk q * P + p for thread p: conflict-free shared-memory reads), and the group sums
// its partial reductions with P - 1 shuffles. P = 1 keeps the whole row in one thread; a larger P puts more warps
// on each SM (B H blocks barely fill 132 SMs at one warp per scheduler) at the cost of the shuffles.
//
// Staging: both kernels read the step vectors in tiles of CS = 8 steps, converted to fp32 and double-buffered in
// shared memory. While a tile computes, each thread holds its share of the NEXT tile's operands in registers (global
// loads issued before the tile's steps, so their latency hides behind them) and writes them into the other buffer
// after the steps: one __syncthreads a tile. A full tile's steps are unrolled (the compiler may hoist the next step's
// shared loads above this step's shuffles). The staged vectors are read back as float4 broadcasts. (The designs this
// replaced, each measured against it: a chunk of 16 steps staged and waited for, tiles without unrolling, the
// forward's two reductions fused, a head's value columns split over 2 or 4 blocks; docs/RESULTS.md, "WKV-7 in the
// training step" and the kernel shoot-outs before it.)
//
// Forward: the group j owns the value column S[:, j], so both reductions over keys (sa, o) stay in the group; they
// keep four partial sums (one per float4 lane) to shorten their dependency chains. With ``save`` it writes, for the
// backward, sa_t (fp32 [B, T, H, N]) and the state after the last step of every chunk of C = 16 steps (fp32
// [B, H, ceil(T / C), N, N], stored S[k, v]); without, only the final state (into slot 0).
//
// Backward: the group i owns the key row S[i, :] and the row G[i, :], so dr, dk, db, dw, da reduce inside the
// group, and also the column G[:, i] (a second copy of G, updated with the same formulas), so dv and dsa reduce
// inside the group too: 3 x 64 / P fp32 registers a thread. dsa is exchanged through shared memory
// (double-buffered by step parity: one __syncthreads a step). The state walks backwards by undoing each step,
// S_{t-1} = (S_t - k v^T - b sa^T) / d, with sa_t exact from the forward, and restarts from the exact checkpoint
// at every chunk end. Undoing amplifies a rounding by 1/d per step, and RWKV-7's decay is at least
// exp(-exp(-0.5)) = 0.545 (w >= -exp(-0.5), which our sigmoid parameterisation keeps, reaching equality only when
// the sigmoid saturates in fp32), so by at most 1.83^16 ~ 1.6e4 in a channel pinned at that floor before the
// next checkpoint resets it. Measured on the algorithm in fp32 (tests/models/test_wkv7_cuda.py, T = 512, N = 64):
// gradient errors ~4e-6 relative for RWKV-7-like decays, ~2.5e-4 with every decay at the floor; bf16 outputs round
// at ~2e-3 anyway. Decays far below the floor (which the model never produces) would degrade the backward.

#ifndef WKV7_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>
#include <stdlib.h>

namespace {

constexpr int N = 64;  // head size
constexpr int C = 16;  // steps a chunk: the checkpoint stride

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float4 q4(const float* row, int q) { return reinterpret_cast<const float4*>(row)[q]; }

// the sum over the P adjacent lanes of a group (every thread of the block calls it: no divergence around it)
template <int P> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int off = 1; off < P; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// The backward's grid for ``bh`` (batch x head) blocks on ``sms`` SMs that hold ``per_sm`` blocks each: every
// resident slot (``sms * per_sm``) when the blocks fill more than one a SM and less than one wave, else ``bh``
// (see bwd_grid). Host code.
inline int padded_grid(int bh, int sms, int per_sm) {
    const int wave = sms * per_sm;
    return bh > sms && bh < wave ? wave : bh;
}

__device__ __forceinline__ int64_t at(int bb, int Tn, int t, int H, int hh, int n) {
    return ((int64_t(bb) * Tn + t) * H + hh) * N + n;
}

// ---------------------------------------------------------------------------------------------- staging

constexpr int CS = 8;  // steps a tile (divides C)

// One thread's share (of NT threads) of a tile of one operand, in registers: element u is step e / N, channel e % N,
// e = tid + u NT (coalesced loads). Steps past the sequence's end read as zeros.
template <typename X, int NT> struct TileRegs {
    X x[CS * N / NT];
    __device__ __forceinline__ void fetch(const X* __restrict__ src, int bb, int Tn, int t0, int len, int H, int hh,
                                          int tid) {
#pragma unroll
        for (int u = 0; u < CS * N / NT; ++u) {
            const int e = tid + u * NT, tt = e / N, n = e % N;
            x[u] = tt < len ? src[at(bb, Tn, t0 + tt, H, hh, n)] : from_f<X>(0.f);
        }
    }
    __device__ __forceinline__ float get(int u) const { return to_f(x[u]); }
};

// a hint: bring the 128-byte line holding p into L2 (nothing on the host)
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef WKV7_HOST_EMULATION
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

// ---------------------------------------------------------------------------------------------- forward

template <typename T, typename TW, int P>
__global__ void __launch_bounds__(N * P) wkv7_fwd_kernel(
    int Tn, int H, const T* __restrict__ r_, const TW* __restrict__ w_, const T* __restrict__ k_,
    const T* __restrict__ v_, const T* __restrict__ a_, const T* __restrict__ b_, T* __restrict__ o_,
    float* __restrict__ sa_, float* __restrict__ ckpt_, int save) {
    constexpr int NQ = N / (4 * P), NT = N * P, U = CS * N / NT;  // NQ: float4 chunks a thread holds
    static_assert(NT >= 32, "whole warps");
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H, tid = threadIdx.x, j = tid / P, p = tid % P;
    const int NC = (Tn + C - 1) / C, M = (Tn + CS - 1) / CS;
    __shared__ __align__(16) float sh_r[2][CS][N];
    __shared__ __align__(16) float sh_d[2][CS][N];
    __shared__ __align__(16) float sh_k[2][CS][N];
    __shared__ __align__(16) float sh_v[2][CS][N];
    __shared__ __align__(16) float sh_a[2][CS][N];
    __shared__ __align__(16) float sh_b[2][CS][N];

    TileRegs<T, NT> pr, pk, pv, pa, pb;
    TileRegs<TW, NT> pw;
    auto fetch = [&](int m) {
        const int t0 = m * CS, len = min(CS, Tn - t0);
        pr.fetch(r_, bb, Tn, t0, len, H, hh, tid);
        pw.fetch(w_, bb, Tn, t0, len, H, hh, tid);
        pk.fetch(k_, bb, Tn, t0, len, H, hh, tid);
        pv.fetch(v_, bb, Tn, t0, len, H, hh, tid);
        pa.fetch(a_, bb, Tn, t0, len, H, hh, tid);
        pb.fetch(b_, bb, Tn, t0, len, H, hh, tid);
    };
    auto commit = [&](int buf) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int e = tid + u * NT, tt = e / N, n = e % N;
            sh_r[buf][tt][n] = pr.get(u);
            sh_d[buf][tt][n] = __expf(pw.get(u));
            sh_k[buf][tt][n] = pk.get(u);
            sh_v[buf][tt][n] = pv.get(u);
            sh_a[buf][tt][n] = pa.get(u);
            sh_b[buf][tt][n] = pb.get(u);
        }
    };

    float S[4 * NQ];  // S[i, j] for the rows i = 4 (q P + p) + e of this thread: its share of the value column j
#pragma unroll
    for (int x = 0; x < 4 * NQ; ++x) S[x] = 0.f;

    fetch(0);
    commit(0);
    __syncthreads();
    for (int m = 0; m < M; ++m) {
        const int buf = m & 1, t0 = m * CS, len = min(CS, Tn - t0);
        if (m + 1 < M) fetch(m + 1);  // in flight while this tile computes

        auto step = [&](int tt) {
            const float vj = sh_v[buf][tt][j];
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const float4 A = q4(sh_a[buf][tt], q * P + p);
                acc.x = fmaf(A.x, S[4 * q + 0], acc.x);
                acc.y = fmaf(A.y, S[4 * q + 1], acc.y);
                acc.z = fmaf(A.z, S[4 * q + 2], acc.z);
                acc.w = fmaf(A.w, S[4 * q + 3], acc.w);
            }
            const float saj = group_sum<P>((acc.x + acc.y) + (acc.z + acc.w));
            float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int qq = q * P + p;
                const float4 D = q4(sh_d[buf][tt], qq), K = q4(sh_k[buf][tt], qq), B = q4(sh_b[buf][tt], qq),
                             R = q4(sh_r[buf][tt], qq);
                S[4 * q + 0] = fmaf(D.x, S[4 * q + 0], fmaf(B.x, saj, K.x * vj));
                S[4 * q + 1] = fmaf(D.y, S[4 * q + 1], fmaf(B.y, saj, K.y * vj));
                S[4 * q + 2] = fmaf(D.z, S[4 * q + 2], fmaf(B.z, saj, K.z * vj));
                S[4 * q + 3] = fmaf(D.w, S[4 * q + 3], fmaf(B.w, saj, K.w * vj));
                y.x = fmaf(R.x, S[4 * q + 0], y.x);
                y.y = fmaf(R.y, S[4 * q + 1], y.y);
                y.z = fmaf(R.z, S[4 * q + 2], y.z);
                y.w = fmaf(R.w, S[4 * q + 3], y.w);
            }
            const float oj = group_sum<P>((y.x + y.y) + (y.z + y.w));
            if (p == 0) {
                const int64_t idx = at(bb, Tn, t0 + tt, H, hh, j);
                o_[idx] = from_f<T>(oj);
                if (save) sa_[idx] = saj;
            }
        };
        if (len == CS) {
#pragma unroll
            for (int tt = 0; tt < CS; ++tt) step(tt);
        } else {
            for (int tt = 0; tt < len; ++tt) step(tt);
        }

        const bool chunk_end = (t0 + len) % C == 0 || m == M - 1;
        if (chunk_end && (save || m == M - 1)) {  // the state after the chunk's last step, S[k, v]: coalesced over j
            const int c = t0 / C;
            float* dst = ckpt_ + (int64_t(bh) * (save ? NC : 1) + (save ? c : 0)) * (N * N) + j;
#pragma unroll
            for (int q = 0; q < NQ; ++q)
#pragma unroll
                for (int e = 0; e < 4; ++e) dst[(4 * (q * P + p) + e) * N] = S[4 * q + e];
        }
        if (m + 1 < M) commit(buf ^ 1);  // the other buffer: its readers (tile m - 1) passed the last barrier
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------- backward

template <typename T, typename TW, int P>
__global__ void __launch_bounds__(N * P) wkv7_bwd_kernel(
    int BH, int Tn, int H, const T* __restrict__ r_, const TW* __restrict__ w_, const T* __restrict__ k_,
    const T* __restrict__ v_, const T* __restrict__ a_, const T* __restrict__ b_, const T* __restrict__ do_,
    const float* __restrict__ sa_, const float* __restrict__ ckpt_, const float* __restrict__ dht_,
    T* __restrict__ dr_, TW* __restrict__ dw_, T* __restrict__ dk_, T* __restrict__ dv_, T* __restrict__ da_,
    T* __restrict__ db_) {
    constexpr int NQ = N / (4 * P), U = CS / P;
    if (int(blockIdx.x) >= BH) return;  // a padding block (bwd_grid): nothing to do
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H, tid = threadIdx.x, i = tid / P, p = tid % P;
    const int NC = (Tn + C - 1) / C, M = (Tn + CS - 1) / CS;
    __shared__ __align__(16) float sh_r[2][CS][N];
    __shared__ __align__(16) float sh_d[2][CS][N];
    __shared__ __align__(16) float sh_k[2][CS][N];
    __shared__ __align__(16) float sh_v[2][CS][N];
    __shared__ __align__(16) float sh_a[2][CS][N];
    __shared__ __align__(16) float sh_b[2][CS][N];
    __shared__ __align__(16) float sh_do[2][CS][N];
    __shared__ __align__(16) float sh_sa[2][CS][N];
    __shared__ __align__(16) float sh_dsa[2][N];

    TileRegs<T, N * P> pr, pk, pv, pa, pb, pdo;
    TileRegs<TW, N * P> pw;
    TileRegs<float, N * P> psa;
    auto fetch = [&](int m) {
        const int t0 = m * CS, len = min(CS, Tn - t0);
        pr.fetch(r_, bb, Tn, t0, len, H, hh, tid);
        pw.fetch(w_, bb, Tn, t0, len, H, hh, tid);
        pk.fetch(k_, bb, Tn, t0, len, H, hh, tid);
        pv.fetch(v_, bb, Tn, t0, len, H, hh, tid);
        pa.fetch(a_, bb, Tn, t0, len, H, hh, tid);
        pb.fetch(b_, bb, Tn, t0, len, H, hh, tid);
        pdo.fetch(do_, bb, Tn, t0, len, H, hh, tid);
        psa.fetch(sa_, bb, Tn, t0, len, H, hh, tid);
    };
    auto commit = [&](int buf) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int e = tid + u * N * P, tt = e / N, n = e % N;
            sh_r[buf][tt][n] = pr.get(u);
            sh_d[buf][tt][n] = __expf(pw.get(u));
            sh_k[buf][tt][n] = pk.get(u);
            sh_v[buf][tt][n] = pv.get(u);
            sh_a[buf][tt][n] = pa.get(u);
            sh_b[buf][tt][n] = pb.get(u);
            sh_do[buf][tt][n] = pdo.get(u);
            sh_sa[buf][tt][n] = psa.get(u);
        }
    };

    // this thread's share: the columns (of S and G's row i) and rows (of G's column i) 4 (q P + p) + e
    float S[4 * NQ];   // S[i, j]: the key row i of the state
    float G[4 * NQ];   // G[i, j]: the same row of the state's gradient
    float Gc[4 * NQ];  // G[k, i]: the column i of the state's gradient (a second copy)
    if (dht_ != nullptr) {
        const float* src = dht_ + int64_t(bh) * (N * N);
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
            const float4 g = q4(src + i * N, q * P + p);
            G[4 * q + 0] = g.x;
            G[4 * q + 1] = g.y;
            G[4 * q + 2] = g.z;
            G[4 * q + 3] = g.w;
#pragma unroll
            for (int e = 0; e < 4; ++e) Gc[4 * q + e] = src[(4 * (q * P + p) + e) * N + i];
        }
    } else {
#pragma unroll
        for (int x = 0; x < 4 * NQ; ++x) {
            G[x] = 0.f;
            Gc[x] = 0.f;
        }
    }
#pragma unroll
    for (int x = 0; x < 4 * NQ; ++x) S[x] = 0.f;
    int par = 0;

    fetch(M - 1);
    commit((M - 1) & 1);
    __syncthreads();
    for (int m = M - 1; m >= 0; --m) {
        const int buf = m & 1, t0 = m * CS, len = min(CS, Tn - t0);
        if ((t0 + len) % C == 0 || m == M - 1) {  // the chunk's last tile: S_t from its checkpoint
            const float* src = ckpt_ + (int64_t(bh) * NC + t0 / C) * (N * N) + i * N;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const float4 s = q4(src, q * P + p);
                S[4 * q + 0] = s.x;
                S[4 * q + 1] = s.y;
                S[4 * q + 2] = s.z;
                S[4 * q + 3] = s.w;
            }
        }
        if (m > 0) fetch(m - 1);  // in flight while this tile computes
        if (m > 0 && t0 % C == 0) {  // the chunk's first tile: the next one restarts from the checkpoint below
            const float* src = ckpt_ + (int64_t(bh) * NC + t0 / C - 1) * (N * N) + i * N;
#pragma unroll
            for (int q = 0; q < NQ; ++q) prefetch_l2(src + 4 * (q * P + p));
        }

        auto step = [&](int tt) {  // step t0 + tt, from the buffer buf
            const float ri = sh_r[buf][tt][i], di = sh_d[buf][tt][i], ki = sh_k[buf][tt][i];
            const float ai = sh_a[buf][tt][i], bi = sh_b[buf][tt][i], doi = sh_do[buf][tt][i], inv_di = 1.f / di;
            float dr = 0.f, dk = 0.f, db = 0.f, dd = 0.f;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int qq = q * P + p;
                const float4 DO = q4(sh_do[buf][tt], qq), V = q4(sh_v[buf][tt], qq), SA = q4(sh_sa[buf][tt], qq);
#define WKV7_ROW(e, m)                                            \
    G[4 * q + e] = fmaf(ri, DO.m, G[4 * q + e]);                   \
    dr = fmaf(S[4 * q + e], DO.m, dr);                             \
    S[4 * q + e] = (S[4 * q + e] - ki * V.m - bi * SA.m) * inv_di; \
    dk = fmaf(G[4 * q + e], V.m, dk);                              \
    db = fmaf(G[4 * q + e], SA.m, db);                             \
    dd = fmaf(G[4 * q + e], S[4 * q + e], dd);
                WKV7_ROW(0, x)
                WKV7_ROW(1, y)
                WKV7_ROW(2, z)
                WKV7_ROW(3, w)
#undef WKV7_ROW
            }
            float dv0 = 0.f, dv1 = 0.f, ds0 = 0.f, ds1 = 0.f;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int qq = q * P + p;
                const float4 R = q4(sh_r[buf][tt], qq), K = q4(sh_k[buf][tt], qq), B = q4(sh_b[buf][tt], qq);
                Gc[4 * q + 0] = fmaf(R.x, doi, Gc[4 * q + 0]);
                Gc[4 * q + 1] = fmaf(R.y, doi, Gc[4 * q + 1]);
                Gc[4 * q + 2] = fmaf(R.z, doi, Gc[4 * q + 2]);
                Gc[4 * q + 3] = fmaf(R.w, doi, Gc[4 * q + 3]);
                dv0 = fmaf(Gc[4 * q + 0], K.x, dv0);
                dv1 = fmaf(Gc[4 * q + 1], K.y, dv1);
                dv0 = fmaf(Gc[4 * q + 2], K.z, dv0);
                dv1 = fmaf(Gc[4 * q + 3], K.w, dv1);
                ds0 = fmaf(Gc[4 * q + 0], B.x, ds0);
                ds1 = fmaf(Gc[4 * q + 1], B.y, ds1);
                ds0 = fmaf(Gc[4 * q + 2], B.z, ds0);
                ds1 = fmaf(Gc[4 * q + 3], B.w, ds1);
            }
            dr = group_sum<P>(dr);
            dk = group_sum<P>(dk);
            db = group_sum<P>(db);
            dd = group_sum<P>(dd);
            const float dv = group_sum<P>(dv0 + dv1), dsai = group_sum<P>(ds0 + ds1);
            const int64_t idx = at(bb, Tn, t0 + tt, H, hh, i);
            if (p == 0) {
                sh_dsa[par][i] = dsai;
                dr_[idx] = from_f<T>(dr);
                dk_[idx] = from_f<T>(dk);
                db_[idx] = from_f<T>(db);
                dw_[idx] = from_f<TW>(dd * di);
                dv_[idx] = from_f<T>(dv);
            }
            __syncthreads();  // dsa complete; sh_dsa[par ^ 1] was last read before every thread's previous sync
            float da0 = 0.f, da1 = 0.f;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const float4 DS = q4(sh_dsa[par], q * P + p);
                da0 = fmaf(S[4 * q + 0], DS.x, da0);
                da1 = fmaf(S[4 * q + 1], DS.y, da1);
                da0 = fmaf(S[4 * q + 2], DS.z, da0);
                da1 = fmaf(S[4 * q + 3], DS.w, da1);
                G[4 * q + 0] = fmaf(di, G[4 * q + 0], ai * DS.x);
                G[4 * q + 1] = fmaf(di, G[4 * q + 1], ai * DS.y);
                G[4 * q + 2] = fmaf(di, G[4 * q + 2], ai * DS.z);
                G[4 * q + 3] = fmaf(di, G[4 * q + 3], ai * DS.w);
            }
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int qq = q * P + p;
                const float4 D = q4(sh_d[buf][tt], qq), A = q4(sh_a[buf][tt], qq);
                Gc[4 * q + 0] = fmaf(D.x, Gc[4 * q + 0], A.x * dsai);
                Gc[4 * q + 1] = fmaf(D.y, Gc[4 * q + 1], A.y * dsai);
                Gc[4 * q + 2] = fmaf(D.z, Gc[4 * q + 2], A.z * dsai);
                Gc[4 * q + 3] = fmaf(D.w, Gc[4 * q + 3], A.w * dsai);
            }
            const float da = group_sum<P>(da0 + da1);
            if (p == 0) da_[idx] = from_f<T>(da);
            par ^= 1;
        };
        if (len == CS) {
#pragma unroll
            for (int tt = CS - 1; tt >= 0; --tt) step(tt);
        } else {
            for (int tt = len - 1; tt >= 0; --tt) step(tt);
        }
        if (m > 0) commit(buf ^ 1);  // the other buffer: its readers (tile m + 1) passed the last barrier
        __syncthreads();
    }
}

}  // namespace

#ifndef WKV7_HOST_EMULATION
namespace {

template <typename T, typename TW, int P>
int launch_fwd(int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v, const void* a,
               const void* b, void* o, float* sa, float* ckpt, int save, cudaStream_t stream) {
    wkv7_fwd_kernel<T, TW, P><<<B * H, N * P, 0, stream>>>(Tn, H, (const T*)r, (const TW*)w, (const T*)k, (const T*)v,
                                                           (const T*)a, (const T*)b, (T*)o, sa, ckpt, save);
    return (int)cudaGetLastError();
}

template <typename T, typename TW>
int launch_fwd_split(int split, int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v,
                     const void* a, const void* b, void* o, float* sa, float* ckpt, int save, cudaStream_t s) {
    if (split == 1) return launch_fwd<T, TW, 1>(B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    if (split == 2) return launch_fwd<T, TW, 2>(B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    if (split == 4) return launch_fwd<T, TW, 4>(B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    return -2;
}

// The backward's grid: one block per (batch, head), rounded up to every resident slot of the GPU when the blocks
// fill more than one a SM but less than one wave (the padding blocks return at once). Why: the block scheduler
// hands out blocks in pairs, one to each SM of a TPC, and a partial second wave goes one block a TPC, leaving
// TPCs with three blocks whose blocks run 5-20 % slower than with two or four (bench/wkv_block_trace.py on an H100,
// 2026-12-07: 192 blocks took 0.73-0.76 ms, 264 blocks 0.63). With the grid padded to a whole wave, the real
// blocks keep their pairs. DIFFRWKV_WKV_PAD_GRID=0 launches B H blocks as before (for measuring).
template <typename K>
int bwd_grid(int bh, K kernel, int threads) {
    static const bool pad = [] {
        const char* e = getenv("DIFFRWKV_WKV_PAD_GRID");
        return !(e && e[0] == '0' && e[1] == 0);
    }();
    if (!pad) return bh;
    int dev = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&dev) || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0)) {
        cudaGetLastError();  // a failed query leaves the grid as it is (and no sticky error behind)
        return bh;
    }
    return padded_grid(bh, sms, per_sm);
}

template <typename T, typename TW, int P>
int launch_bwd(int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v, const void* a,
               const void* b, const void* dout, const float* sa, const float* ckpt, const float* dht, void* dr,
               void* dw, void* dk, void* dv, void* da, void* db, cudaStream_t stream) {
    const int grid = bwd_grid(B * H, wkv7_bwd_kernel<T, TW, P>, N * P);
    wkv7_bwd_kernel<T, TW, P><<<grid, N * P, 0, stream>>>(
        B * H, Tn, H, (const T*)r, (const TW*)w, (const T*)k, (const T*)v, (const T*)a, (const T*)b, (const T*)dout, sa, ckpt,
        dht, (T*)dr, (TW*)dw, (T*)dk, (T*)dv, (T*)da, (T*)db);
    return (int)cudaGetLastError();
}

template <typename T, typename TW>
int launch_bwd_split(int split, int B, int Tn, int H, const void* r, const void* w, const void* k, const void* v,
                     const void* a, const void* b, const void* dout, const float* sa, const float* ckpt,
                     const float* dht, void* dr, void* dw, void* dk, void* dv, void* da, void* db, cudaStream_t s) {
    if (split == 1)
        return launch_bwd<T, TW, 1>(B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw, dk, dv, da, db, s);
    if (split == 2)
        return launch_bwd<T, TW, 2>(B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw, dk, dv, da, db, s);
    if (split == 4)
        return launch_bwd<T, TW, 4>(B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw, dk, dv, da, db, s);
    return -2;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- C launchers
// dtype codes: 0 = float32, 1 = bfloat16. ``x_dtype`` for r, k, v, a, b, o (and do, dr, dk, dv, da, db);
// ``w_dtype`` for w and dw. ``split``: threads per state row or column (1, 2 or 4). Returns a cudaError_t
// (0 = launched), -1 for an unsupported dtype pair, -2 for an unsupported split.

int wkv7_cuda_forward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, void* o, float* sa, float* ckpt,
                      int save, void* stream) {
    cudaStream_t s = (cudaStream_t)stream;
    if (x_dtype == 1 && w_dtype == 0)
        return launch_fwd_split<__nv_bfloat16, float>(split, B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    if (x_dtype == 1 && w_dtype == 1)
        return launch_fwd_split<__nv_bfloat16, __nv_bfloat16>(split, B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    if (x_dtype == 0 && w_dtype == 0)
        return launch_fwd_split<float, float>(split, B, Tn, H, r, w, k, v, a, b, o, sa, ckpt, save, s);
    return -1;
}

int wkv7_cuda_backward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r, const void* w,
                       const void* k, const void* v, const void* a, const void* b, const void* dout, const float* sa,
                       const float* ckpt, const float* dht, void* dr, void* dw, void* dk, void* dv, void* da,
                       void* db, void* stream) {
    cudaStream_t s = (cudaStream_t)stream;
    if (x_dtype == 1 && w_dtype == 0)
        return launch_bwd_split<__nv_bfloat16, float>(split, B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw,
                                                      dk, dv, da, db, s);
    if (x_dtype == 1 && w_dtype == 1)
        return launch_bwd_split<__nv_bfloat16, __nv_bfloat16>(split, B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht,
                                                              dr, dw, dk, dv, da, db, s);
    if (x_dtype == 0 && w_dtype == 0)
        return launch_bwd_split<float, float>(split, B, Tn, H, r, w, k, v, a, b, dout, sa, ckpt, dht, dr, dw, dk, dv,
                                              da, db, s);
    return -1;
}
#endif  // WKV7_HOST_EMULATION
