// The training operators the tiny model's step needs, on FP32 tensors: RMSNorm (forward, input
// gradient), SwiGLU (forward, backward), RoPE (both layouts, either direction), softmax
// cross-entropy (per-row log-sum-exp and loss; gradient) and AdamW with FP32 master weights and
// BF16 or FP32 moments. Row reductions accumulate in FP64 as the CPU reference does. Compiled
// with --fmad=false, so AdamW (the same IEEE operations in the same order) equals the CPU bit for
// bit; the rest differs in summation order and in the device's exp/log, within tolerances.

__device__ __forceinline__ double block_sum_d(double v, double* shared32) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = lane < nw ? shared32[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

__device__ __forceinline__ double block_max_d(double v, double* shared32) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = lane < nw ? shared32[lane] : -1.0 / 0.0;
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// y = x * r * w with r = 1 / sqrt(mean(x^2) + eps); one block per row.
extern "C" __global__ void rmsnorm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           float* __restrict__ y, int rows, int d, double eps) {
  __shared__ double red[32];
  const i64 row = blockIdx.x;
  if (row >= rows) return;
  const float* xr = x + row * d;
  double s = 0.0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
  s = block_sum_d(s, red);
  const float r = (float)(1.0 / sqrt(s / d + eps));
  float* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// dx = r * (dy * w - x * c), c = r^2 * <dy * w, x> / d; one block per row.
extern "C" __global__ void rmsnorm_backward_input(const float* __restrict__ x,
                                                  const float* __restrict__ w,
                                                  const float* __restrict__ dy,
                                                  float* __restrict__ dx, int rows, int d,
                                                  double eps) {
  __shared__ double red[32];
  const i64 row = blockIdx.x;
  if (row >= rows) return;
  const float* xr = x + row * d;
  const float* dyr = dy + row * d;
  double s = 0.0, dot = 0.0;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    s += (double)xr[i] * (double)xr[i];
    dot += (double)dyr[i] * (double)w[i] * (double)xr[i];
  }
  s = block_sum_d(s, red);
  dot = block_sum_d(dot, red);
  const double rd = 1.0 / sqrt(s / d + eps);
  const float r = (float)rd;
  const float c = (float)(rd * rd * dot / d);
  float* dxr = dx + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) dxr[i] = r * (dyr[i] * w[i] - xr[i] * c);
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_forward(const float* __restrict__ gate, const float* __restrict__ up,
                                          float* __restrict__ y, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float g = gate[i];
    y[i] = g * sigmoidf_(g) * up[i];
  }
}

extern "C" __global__ void swiglu_backward(const float* __restrict__ gate, const float* __restrict__ up,
                                           const float* __restrict__ dy, float* __restrict__ dgate,
                                           float* __restrict__ dup, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float g = gate[i], u = up[i], d = dy[i];
    const float s = sigmoidf_(g);
    dup[i] = d * g * s;
    dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
  }
}

// x: [tokens = batch * seq, heads, dim]; token t sits at position offset + t % seq. cos/sin are the
// CPU table's FP64 values rounded to FP32, [max_positions, dim / 2]. sign is 1 forward, -1 backward.
// interleaved: pairs (2i, 2i + 1); otherwise pairs (i, i + dim / 2).
extern "C" __global__ void rope(const float* __restrict__ x, float* __restrict__ y,
                                const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                i64 tokens, int seq, int heads, int dim, int offset, float sign,
                                int interleaved) {
  const int half = dim / 2;
  const i64 pairs = tokens * heads * half;
  for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (i64)gridDim.x * blockDim.x) {
    const int i = (int)(p % half);
    const i64 th = p / half;  // token * heads + head
    const i64 t = th / heads;
    const int pos = offset + (int)(t % seq);
    const float c = cos_t[(i64)pos * half + i];
    const float s = sign * sin_t[(i64)pos * half + i];
    const i64 base = th * dim;
    const i64 ia = base + (interleaved ? 2 * i : i);
    const i64 ib = base + (interleaved ? 2 * i + 1 : i + half);
    const float a = x[ia], b = x[ib];
    y[ia] = a * c - b * s;
    y[ib] = a * s + b * c;
  }
}

// Per row: lse = max + log(sum(exp(x - max))) in FP64, loss = lse - x[target] (0 where the target
// is ignore_index, given as -1 for none). One block per row.
extern "C" __global__ void cross_entropy_forward(const float* __restrict__ logits,
                                                 const unsigned int* __restrict__ targets,
                                                 double* __restrict__ lse_out,
                                                 double* __restrict__ loss_out, int rows, int vocab,
                                                 long long ignore_index, int* __restrict__ bad) {
  __shared__ double red[32];
  const i64 row = blockIdx.x;
  if (row >= rows) return;
  const float* x = logits + row * vocab;
  const unsigned int t = targets[row];
  if (ignore_index >= 0 && (long long)t == ignore_index) {
    if (threadIdx.x == 0) {
      lse_out[row] = 0.0;
      loss_out[row] = 0.0;
    }
    return;
  }
  if (t >= (unsigned int)vocab) {
    // A target outside the vocabulary: flagged for the caller, never read.
    if (threadIdx.x == 0) {
      atomicOr(bad, 1);
      lse_out[row] = 0.0;
      loss_out[row] = 0.0;
    }
    return;
  }
  double m = -1.0 / 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmax(m, (double)x[i]);
  m = block_max_d(m, red);
  double s = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)x[i] - m);
  s = block_sum_d(s, red);
  if (threadIdx.x == 0) {
    const double lse = m + log(s);
    lse_out[row] = lse;
    loss_out[row] = lse - (double)x[t];
  }
}

// dlogits = scale * (softmax(x) - onehot(target)) for counted rows, 0 for ignored rows, where
// scale = dloss / count.
extern "C" __global__ void cross_entropy_backward(const float* __restrict__ logits,
                                                  const unsigned int* __restrict__ targets,
                                                  const double* __restrict__ lse,
                                                  float* __restrict__ dlogits, int rows, int vocab,
                                                  long long ignore_index, float scale) {
  const i64 row = blockIdx.x;
  if (row >= rows) return;
  const unsigned int t = targets[row];
  const bool ignored = ignore_index >= 0 && (long long)t == ignore_index;
  const float l = (float)lse[row];
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float g = 0.0f;
    if (!ignored) {
      g = scale * expf(logits[row * vocab + i] - l);
      if ((unsigned int)i == t) g -= scale;
    }
    dlogits[row * vocab + i] = g;
  }
}

struct AdamCoeffs {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bc2, eps,
      grad_scale;
};

__device__ __forceinline__ void adam_apply(const AdamCoeffs& k, float* p, float g, float* m, float* v) {
  const float mn = k.beta1 * *m + k.one_minus_beta1 * g;
  const float vn = k.beta2 * *v + k.one_minus_beta2 * (g * g);
  const float denom = sqrtf(vn) * k.inv_sqrt_bc2 + k.eps;
  *p = *p * k.decay - k.step_size * mn / denom;
  *m = mn;
  *v = vn;
}

// One AdamW step with FP32 moments (the coefficients are computed on the host as the CPU does).
extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, i64 n,
                                     AdamCoeffs k) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float mm = m[i], vv = v[i];
    adam_apply(k, &p[i], g[i] * k.grad_scale, &mm, &vv);
    m[i] = mm;
    v[i] = vv;
  }
}

// One AdamW step with BF16 moments (the DeepSeek-V3 recipe).
extern "C" __global__ void adamw_bf16(float* __restrict__ p, const float* __restrict__ g,
                                      u16* __restrict__ m, u16* __restrict__ v, i64 n, AdamCoeffs k) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float mm = bf16_to_f32(m[i]), vv = bf16_to_f32(v[i]);
    adam_apply(k, &p[i], g[i] * k.grad_scale, &mm, &vv);
    m[i] = bf16_from_f32(mm);
    v[i] = bf16_from_f32(vv);
  }
}
