// cuda/runtime.cu: device queries and the read-back of device status arrays.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "atlas/cuda_ops.h"
#include "common.cuh"

namespace atlas {

int cuda_device_count() {
  int n = 0;
  // No driver, no device, or a driver older than the runtime: report none and
  // clear the error so that it does not surface at an unrelated later call.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

Status cuda_get_device(int* device) { return cuda::cuda_status(cudaGetDevice(device), "cudaGetDevice"); }

Status cuda_set_device(int device) { return cuda::cuda_status(cudaSetDevice(device), "cudaSetDevice"); }

Status cuda_multiprocessor_count(int device, int* count) {
  // Cached per device: the launchers ask on every call.
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) return Status::Invalid("cuda_multiprocessor_count: device must be >= 0");
  if (static_cast<size_t>(device) < cache.size() && cache[device] > 0) {
    *count = cache[device];
    return Status::Ok();
  }
  int n = 0;
  ATLAS_RETURN_IF_ERROR(cuda::cuda_status(
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute"));
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(static_cast<size_t>(device) + 1, 0);
  cache[device] = n;
  *count = n;
  return Status::Ok();
}

const char* device_error_message(int32_t code) {
  switch (static_cast<DeviceError>(code)) {
    case DeviceError::kOk: return "ok";
    case DeviceError::kBadTreeOffsets:
      return "tree_offsets must increase strictly from 0 to the number of nodes (every tree has a root)";
    case DeviceError::kTreeTooLarge: return "a tree has more than MAX_TREE_NODES nodes";
    case DeviceError::kBadParent:
      return "parents must be -1 at the root (tree-local index 0) and in [0, i) for node i > 0";
    case DeviceError::kBadToken: return "a token id is outside [0, vocab)";
    case DeviceError::kTooDeep: return "a tree is deeper than max_accept";
    case DeviceError::kBadSamplingParams:
      return "sampling parameters out of range (temperature >= 0 and finite, top_k >= 0, top_p in (0, 1])";
    case DeviceError::kNonFiniteLogits:
      return "a logit row the walk reads holds NaN or +inf (or overflows when divided by the temperature)";
    case DeviceError::kNoFiniteLogit: return "a logit row the walk reads is all -inf";
    case DeviceError::kBadDraftProbs:
      return "a draft_probs row the walk reads holds a negative, infinite or NaN value, or gives "
             "probability 0 to a child drafted from it (siblings drawn without replacement must be distinct)";
    case DeviceError::kBadQueryOffsets:
      return "q_offsets must be non-decreasing from 0 to the number of queries";
    case DeviceError::kBadContextLength:
      return "a context length is negative, above max_context, or the sequence overflows its block table";
    case DeviceError::kTooManyQueries: return "a sequence has more queries than max_q_per_seq";
    case DeviceError::kBadBlockId: return "a block table entry is outside [0, num_blocks)";
    case DeviceError::kNotAChain:
      return "a sequence with more than MAX_TREE_NODES queries must be a chain (parents[i] = i - 1)";
    case DeviceError::kBadSlot: return "a slot copy names a slot outside [0, num_blocks * block_size)";
  }
  return "unknown device error";
}

Status device_status_check(const int32_t* status, int64_t n, const char* op, void* stream) {
  if (n <= 0) return Status::Ok();
  if (status == nullptr) return Status::Invalid(std::string(op) + ": status array must not be null");
  std::vector<int32_t> host(static_cast<size_t>(n));
  cudaStream_t s = cuda::as_stream(stream);
  ATLAS_RETURN_IF_ERROR(cuda::cuda_status(
      cudaMemcpyAsync(host.data(), status, sizeof(int32_t) * host.size(), cudaMemcpyDeviceToHost, s),
      "cudaMemcpyAsync(status)"));
  ATLAS_RETURN_IF_ERROR(cuda::cuda_status(cudaStreamSynchronize(s), "cudaStreamSynchronize"));
  for (int64_t i = 0; i < n; ++i) {
    if (host[static_cast<size_t>(i)] != 0)
      return Status::Invalid(std::string(op) + ": sequence " + std::to_string(i) + ": " +
                             device_error_message(host[static_cast<size_t>(i)]));
  }
  return Status::Ok();
}

}  // namespace atlas
