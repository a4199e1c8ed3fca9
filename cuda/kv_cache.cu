// cuda/kv_cache.cu: the KV cache's pending row copies (commit of accepted
// paths, copy on write) applied to device storage in one launch.
//
// A copy list is ordered: a later copy may read a row an earlier one wrote
// (read after write) or overwrite a row an earlier one reads (write after
// read). Each thread owns one 16-byte (or smaller) column of the token row in
// one (layer, key/value) plane and applies every copy to that column, in
// order; columns are independent, so no two threads ever touch the same
// bytes and the order within each column is the list's order. Loads of a
// group of copies are issued together and a read of a row written earlier in
// the same group takes the value from registers.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "atlas/cuda_ops.h"
#include "common.cuh"

namespace atlas {
namespace cuda {
namespace {

// Copies whose loads are in flight together per thread.
constexpr int kGroup = 8;
constexpr int kThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kThreads) kv_copy_kernel(V* storage, const SlotCopy* copies, int64_t n,
                                                            int64_t slots, int64_t row_vecs, int64_t columns,
                                                            int32_t* status) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= columns) return;
  const int64_t plane = idx / row_vecs, col = idx % row_vecs;
  // Plain (coherent) loads and stores: a thread reads back what it wrote.
  V* base = storage + plane * slots * row_vecs + col;
  for (int64_t g = 0; g < n; g += kGroup) {
    int64_t src[kGroup], dst[kGroup];
    bool ok[kGroup];
    V v[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      ok[k] = false;
      src[k] = dst[k] = -1;
      if (g + k < n) {
        const SlotCopy c = copies[g + k];
        ok[k] = c.src_slot >= 0 && c.src_slot < slots && c.dst_slot >= 0 && c.dst_slot < slots;
        if (ok[k]) {
          src[k] = c.src_slot;
          dst[k] = c.dst_slot;
        } else if (status != nullptr) {
          *status = static_cast<int32_t>(DeviceError::kBadSlot);
        }
      }
      if (ok[k]) v[k] = base[src[k] * row_vecs];
    }
#pragma unroll
    for (int k = 1; k < kGroup; ++k) {
#pragma unroll
      for (int j = 0; j < k; ++j)
        if (ok[j] && ok[k] && src[k] == dst[j]) v[k] = v[j];  // the latest earlier writer wins
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k)
      if (ok[k]) base[dst[k] * row_vecs] = v[k];
  }
}

template <typename V>
Status launch(const KVCacheConfig& c, void* storage, const SlotCopy* copies, int64_t n, int64_t row_bytes,
              cudaStream_t s, int32_t* status) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t slots = static_cast<int64_t>(c.num_blocks) * c.block_size;
  const int64_t columns = static_cast<int64_t>(c.num_layers) * 2 * row_vecs;
  const int64_t blocks = (columns + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) return Status::Invalid("kv_copy_slots_cuda: the cache is too large for one launch");
  kv_copy_kernel<V><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(static_cast<V*>(storage), copies, n,
                                                                       slots, row_vecs, columns, status);
  return launch_status("kv_copy_kernel");
}

}  // namespace
}  // namespace cuda

Status kv_copy_slots_cuda(const KVCacheConfig& c, void* storage, const SlotCopy* copies, int64_t n,
                          void* stream, int32_t* status_out) {
  if (c.num_layers < 1 || c.num_kv_heads < 1 || c.head_dim < 1 || c.num_blocks < 1 || c.block_size < 1)
    return Status::Invalid("kv_copy_slots_cuda: config sizes must be positive");
  if (c.dtype != DType::kFloat32 && c.dtype != DType::kBFloat16)
    return Status::Invalid("kv_copy_slots_cuda: dtype must be float32 or bfloat16");
  if (n < 0) return Status::Invalid("kv_copy_slots_cuda: n must be >= 0, got " + std::to_string(n));
  if (storage == nullptr) return Status::Invalid("kv_copy_slots_cuda: storage must not be null");
  if (n > 0 && copies == nullptr) return Status::Invalid("kv_copy_slots_cuda: copies must not be null");
  cudaStream_t s = cuda::as_stream(stream);
  if (status_out != nullptr)
    ATLAS_RETURN_IF_ERROR(
        cuda::cuda_status(cudaMemsetAsync(status_out, 0, sizeof(int32_t), s), "cudaMemsetAsync"));
  if (n == 0) return Status::Ok();
  const int64_t row_bytes = static_cast<int64_t>(c.num_kv_heads) * c.head_dim * dtype_size(c.dtype);
  // The widest access that divides the row and the storage's alignment.
  const uintptr_t a = reinterpret_cast<uintptr_t>(storage) | static_cast<uintptr_t>(row_bytes);
  if (a % 16 == 0) return cuda::launch<uint4>(c, storage, copies, n, row_bytes, s, status_out);
  if (a % 8 == 0) return cuda::launch<uint2>(c, storage, copies, n, row_bytes, s, status_out);
  if (a % 4 == 0) return cuda::launch<uint32_t>(c, storage, copies, n, row_bytes, s, status_out);
  if (a % 2 == 0) return cuda::launch<uint16_t>(c, storage, copies, n, row_bytes, s, status_out);
  return Status::Invalid("kv_copy_slots_cuda: storage must be at least 2-byte aligned");
}

}  // namespace atlas
