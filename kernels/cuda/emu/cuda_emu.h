// A host emulation of the CUDA execution model, just enough to run Shoal's kernel sources on CPU
// threads in CI (which has no GPU): every CUDA thread is an OS thread, warps synchronize through a
// 32-party barrier (shuffles exchange through it), blocks through a block-wide barrier.
//
// It checks the kernels' logic - indexing, warp and block collectives, the dispatch protocol - not
// GPU-specific behaviour: PTX (mma.sync, cvt, ld.acquire) is replaced by the sources' portable
// paths (`#if __CUDA_ARCH__` / `#ifdef SHOAL_EMU`), and host math may differ from the device's
// in the last place for exp/log.
//
// Two launch modes: `launch_seq` runs the blocks one after another on one set of threads (kernels
// with __shared__ memory, which becomes a function-local static); `launch_all` runs every block at
// once (kernels whose blocks wait on each other, which must then not use __shared__).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define SHOAL_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  unsigned long long slots[32];
};
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(int n) : bar(n) {
    for (int i = 0; i < n / 32; i++) warps.emplace_back(new Warp());
  }
};
inline thread_local dim3 tid, bid;
inline thread_local int flat = 0;
inline thread_local Block* block = nullptr;
inline dim3 bdim, gdim;

template <class F>
void run_thread(Block* b, int t, F& f, dim3 blk) {
  tid = dim3{(unsigned)t % bdim.x, ((unsigned)t / bdim.x) % bdim.y, (unsigned)t / (bdim.x * bdim.y)};
  flat = t;
  block = b;
  bid = blk;
  f();
}

// cp.async as the hardware defines it: a copy lands only when a cp.async.wait_group lets its
// group complete. Until then its destination holds 0x7F bytes (an E4M3 NaN), so a kernel that
// reads a stage too early computes NaNs instead of passing by luck.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};
inline thread_local std::vector<AsyncCopy> copies_open;
inline thread_local std::deque<std::vector<AsyncCopy>> copies_committed;
inline void cp_async16(void* dst, const void* src, int bytes) {
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memset(c.data, 0, 16);
  if (bytes) std::memcpy(c.data, src, 16);
  std::memset(dst, 0x7F, 16);
  copies_open.push_back(c);
}
inline void cp_async_commit() {
  copies_committed.push_back(std::move(copies_open));
  copies_open.clear();
}
// Completes every committed group but the `pending` newest.
inline void cp_async_wait(int pending) {
  while ((int)copies_committed.size() > pending) {
    for (auto& c : copies_committed.front()) std::memcpy(c.dst, c.data, 16);
    copies_committed.pop_front();
  }
}

// Dynamic shared memory (`extern __shared__`): one buffer, which the blocks of a `launch_seq`
// launch use in turn. Kernels reach it through this function under SHOAL_EMU.
inline unsigned char* dynamic_smem() {
  alignas(1024) static unsigned char buf[256 * 1024];
  return buf;
}

// Blocks one after another; the threads of a block run concurrently.
template <class F>
void launch_seq(dim3 g, dim3 b, F f) {
  gdim = g;
  bdim = b;
  const int n = (int)(b.x * b.y * b.z);
  Block blk(n);
  std::vector<std::thread> ts;
  for (int t = 0; t < n; t++) {
    ts.emplace_back([&, t] {
      for (unsigned z = 0; z < g.z; z++)
        for (unsigned y = 0; y < g.y; y++)
          for (unsigned x = 0; x < g.x; x++) {
            run_thread(&blk, t, f, dim3{x, y, z});
            blk.bar.arrive_and_wait();
          }
    });
  }
  for (auto& t : ts) t.join();
}

// Every block at once.
template <class F>
void launch_all(dim3 g, dim3 b, F f) {
  gdim = g;
  bdim = b;
  const int n = (int)(b.x * b.y * b.z);
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::thread> ts;
  for (unsigned z = 0; z < g.z; z++)
    for (unsigned y = 0; y < g.y; y++)
      for (unsigned x = 0; x < g.x; x++) {
        blocks.emplace_back(new Block(n));
        Block* blk = blocks.back().get();
        for (int t = 0; t < n; t++) ts.emplace_back([&f, blk, t, x, y, z] { run_thread(blk, t, f, dim3{x, y, z}); });
      }
  for (auto& t : ts) t.join();
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[emu::flat / 32]->bar.arrive_and_wait(); }

template <class T>
T emu_shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  emu::Warp* w = emu::block->warps[emu::flat / 32].get();
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slots[emu::flat & 31] = bits;
  w->bar.arrive_and_wait();
  const unsigned long long r = w->slots[src_lane & 31];
  w->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) { return emu_shfl(v, (emu::flat & 31) ^ mask); }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
using std::max;
using std::min;

inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int cmp, int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
