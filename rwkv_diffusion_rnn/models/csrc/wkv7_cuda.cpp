// Torch glue of the WKV-7 CUDA kernels (wkv7_cuda.cu): checks, allocation-free calls on the current stream,
// registered as the operators torch.ops.diffrwkv_wkv7.forward / .backward. The Python side
// (rwkv_diffusion_rnn/models/wkv7_cuda.py) allocates every tensor and validates shapes; the checks here only guard
// the raw pointers handed to the kernels. Light headers (not torch/extension.h): the build takes seconds, not
// minutes.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

int wkv7_cuda_forward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, void* o, float* sa, float* ckpt, int save,
                      void* stream);
int wkv7_cuda_backward(int x_dtype, int w_dtype, int split, int B, int Tn, int H, const void* r, const void* w, const void* k,
                       const void* v, const void* a, const void* b, const void* dout, const float* sa,
                       const float* ckpt, const float* dht, void* dr, void* dw, void* dk, void* dv, void* da,
                       void* db, void* stream);

namespace {

int code(const at::Tensor& x) {
    if (x.scalar_type() == at::kFloat) return 0;
    if (x.scalar_type() == at::kBFloat16) return 1;
    TORCH_CHECK(false, "wkv7_cuda: dtype must be float32 or bfloat16, got ", x.scalar_type());
    return -1;
}

void check(const at::Tensor& x, const at::Tensor& like, const char* name) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "wkv7_cuda: ", name, " must be a contiguous CUDA tensor");
    TORCH_CHECK(x.device() == like.device(), "wkv7_cuda: ", name, " is on another device");
}

void check_same(const at::Tensor& x, const at::Tensor& like, const char* name) {
    check(x, like, name);
    TORCH_CHECK(x.sizes() == like.sizes() && x.scalar_type() == like.scalar_type(), "wkv7_cuda: ", name,
                " must match r's shape and dtype");
}

void check_f32(const at::Tensor& x, const at::Tensor& like, int64_t numel, const char* name) {
    check(x, like, name);
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == numel, "wkv7_cuda: ", name,
                " must be float32 with ", numel, " elements");
}

void check_operands(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& a, const at::Tensor& b) {
    check(r, r, "r");
    TORCH_CHECK(r.dim() == 4 && r.size(3) == 64, "wkv7_cuda: operands must be [B, T, H, 64]");
    check(w, r, "w");
    TORCH_CHECK(w.sizes() == r.sizes(), "wkv7_cuda: w must match r's shape");
    check_same(k, r, "k");
    check_same(v, r, "v");
    check_same(a, r, "a");
    check_same(b, r, "b");
}

}  // namespace

// o [B, T, H, 64] (r's dtype); sa [B, T, H, 64] fp32 (save); ckpt [B, H, ceil(T/16) or 1, 64, 64] fp32;
// split: threads per state row or column (1, 2 or 4).
void forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
             const at::Tensor& o, const at::Tensor& sa, const at::Tensor& ckpt, bool save, int64_t split) {
    check_operands(r, w, k, v, a, b);
    check_same(o, r, "o");
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t NC = (T + 15) / 16;
    if (save) check_f32(sa, r, r.numel(), "sa");
    check_f32(ckpt, r, int64_t(B) * H * (save ? NC : 1) * 64 * 64, "ckpt");
    const c10::cuda::CUDAGuard guard(r.device());
    const int err = wkv7_cuda_forward(code(r), code(w), int(split), B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(),
                                      v.data_ptr(), a.data_ptr(), b.data_ptr(), o.data_ptr(),
                                      save ? sa.data_ptr<float>() : nullptr, ckpt.data_ptr<float>(), save ? 1 : 0,
                                      c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err != -1, "wkv7_cuda: unsupported dtypes (r ", r.scalar_type(), ", w ", w.scalar_type(), ")");
    TORCH_CHECK(err != -2, "wkv7_cuda: split must be 1, 2 or 4, got ", split);
    TORCH_CHECK(err == 0, "wkv7_cuda: forward launch failed: ", cudaGetErrorString(cudaError_t(err)));
}

// dht: [B, H, 64, 64] fp32 gradient of the final state, or an empty tensor for none. Gradients: dw in w's dtype,
// the others in r's dtype; split as in the forward.
void backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& dout, const at::Tensor& sa, const at::Tensor& ckpt, const at::Tensor& dht, const at::Tensor& dr,
              const at::Tensor& dw, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& da, const at::Tensor& db,
              int64_t split) {
    check_operands(r, w, k, v, a, b);
    check_same(dout, r, "do");
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int64_t NC = (T + 15) / 16;
    check_f32(sa, r, r.numel(), "sa");
    check_f32(ckpt, r, int64_t(B) * H * NC * 64 * 64, "ckpt");
    const bool has_dht = dht.numel() > 0;
    if (has_dht) check_f32(dht, r, int64_t(B) * H * 64 * 64, "dht");
    check_same(dr, r, "dr");
    check_same(dk, r, "dk");
    check_same(dv, r, "dv");
    check_same(da, r, "da");
    check_same(db, r, "db");
    check_same(dw, w, "dw");
    const c10::cuda::CUDAGuard guard(r.device());
    const int err = wkv7_cuda_backward(code(r), code(w), int(split), B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(),
                                       v.data_ptr(), a.data_ptr(), b.data_ptr(), dout.data_ptr(),
                                       sa.data_ptr<float>(), ckpt.data_ptr<float>(),
                                       has_dht ? dht.data_ptr<float>() : nullptr, dr.data_ptr(), dw.data_ptr(),
                                       dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err != -1, "wkv7_cuda: unsupported dtypes (r ", r.scalar_type(), ", w ", w.scalar_type(), ")");
    TORCH_CHECK(err != -2, "wkv7_cuda: split must be 1, 2 or 4, got ", split);
    TORCH_CHECK(err == 0, "wkv7_cuda: backward launch failed: ", cudaGetErrorString(cudaError_t(err)));
}

TORCH_LIBRARY(diffrwkv_wkv7, m) {
    m.def("forward", &forward);
    m.def("backward", &backward);
}
