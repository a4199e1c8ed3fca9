// Draft head: the native forward of the learned speculator and its versioned
// weights (see atlas/head.h for the module and the versioning rules).
//
// Layout. push() repacks every weight matrix W [N, K] (torch layout, N outputs)
// into panels of kHeadPanel output columns: panel p holds, for k = 0..K-1, the
// kHeadPanel values W[p * kHeadPanel + l][k] next to each other, zero-padded
// past N. A GEMM then streams each panel once per row tile, front to back, and
// its inner loop is a fixed-size axpy over the panel's columns that the
// compiler turns into SSE multiplies and adds with the accumulators in
// registers; the sum over k runs in order, as a plain dot product would.
#include "atlas/head.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

namespace atlas {

namespace {

constexpr const char* kNames[kNumHeadTensors] = {"w_in", "b_in", "norm1", "w_gate", "w_up",
                                                 "w_down", "norm2", "w_out"};

// Rows of input per micro-kernel call: 4 rows x 8 columns = 8 SSE accumulators,
// which with the two panel vectors and a broadcast fit the 16 SSE registers
// (6 rows measured no faster).
constexpr int kKernelRows = 4;

struct Shape {
  int32_t ndim;
  int64_t d0, d1;
  const char* text;  // the symbolic shape, for messages
};

Shape expected_shape(const HeadConfig& c, int32_t t) {
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  switch (t) {
    case kHeadWIn: return {2, H, 2 * H, "(H, 2H)"};
    case kHeadWGate: return {2, I, H, "(I, H)"};
    case kHeadWUp: return {2, I, H, "(I, H)"};
    case kHeadWDown: return {2, H, I, "(H, I)"};
    case kHeadWOut: return {2, V, H, "(Vd, H)"};
    default: return {1, H, 1, "(H,)"};  // b_in, norm1, norm2
  }
}

std::string shape_text(int32_t ndim, int64_t d0, int64_t d1) {
  if (ndim == 1) return "(" + std::to_string(d0) + ",)";
  return "(" + std::to_string(d0) + ", " + std::to_string(d1) + ")";
}

std::string shape_text(const HeadTensorRef& r) {
  if (r.ndim == 1) return shape_text(1, r.shape[0], 0);
  if (r.ndim == 2) return shape_text(2, r.shape[0], r.shape[1]);
  return std::to_string(r.ndim) + "-D";
}

// Copies W [n, k] into panels (see the top of this file); fails on the first
// value that is not finite.
Status pack_panels(const char* name, const float* w, int64_t n, int64_t k, std::vector<float>* out) {
  const int64_t panels = (n + kHeadPanel - 1) / kHeadPanel;
  out->assign(static_cast<size_t>(panels * k * kHeadPanel), 0.0f);
  float* dst = out->data();
  for (int64_t row = 0; row < n; ++row) {
    const float* src = w + row * k;
    float* panel = dst + (row / kHeadPanel) * k * kHeadPanel + row % kHeadPanel;
    for (int64_t j = 0; j < k; ++j) {
      const float v = src[j];
      if (!std::isfinite(v))
        return Status::Invalid(std::string(name) + " holds a non-finite value (" + std::to_string(v) +
                               ") at [" + std::to_string(row) + ", " + std::to_string(j) + "]");
      panel[j * kHeadPanel] = v;
    }
  }
  return Status::Ok();
}

Status copy_vector(const char* name, const float* w, int64_t n, std::vector<float>* out) {
  out->assign(w, w + n);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(w[i]))
      return Status::Invalid(std::string(name) + " holds a non-finite value (" + std::to_string(w[i]) +
                             ") at [" + std::to_string(i) + "]");
  return Status::Ok();
}

// Four floats, one SSE register. Written with GCC/Clang generic vectors rather
// than plain loops because GCC's loop vectoriser otherwise picks the k loop
// below (an in-order float reduction: transposes and scalar adds, 4x slower)
// instead of the columns of the panel.
typedef float Vec4 __attribute__((vector_size(16)));
static_assert(kHeadPanel == 8, "the micro-kernel handles a panel as two Vec4");

inline Vec4 load4(const float* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// y[r, l] = bias[l] (0 when null) + sum_k x[r * ldx + k] * panel[k * 8 + l] for
// r < R, l < cols; the sum over k runs in order.
template <int R>
inline void panel_kernel(const float* __restrict x, int64_t ldx, int64_t k_len, const float* __restrict panel,
                         const float* bias, float* __restrict y, int64_t ldy, int64_t cols) {
  Vec4 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec4{0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k = 0; k < k_len; ++k) {
    const Vec4 w0 = load4(panel + k * kHeadPanel), w1 = load4(panel + k * kHeadPanel + 4);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * ldx + k];
      const Vec4 xv = {xs, xs, xs, xs};
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[kHeadPanel];
    std::memcpy(out, &acc[r][0], sizeof(Vec4));
    std::memcpy(out + 4, &acc[r][1], sizeof(Vec4));
    float* yr = y + r * ldy;
    for (int64_t l = 0; l < cols; ++l) yr[l] = out[l] + (bias ? bias[l] : 0.0f);
  }
}

// y[r, j] = bias[j] (0 when bias is null) + sum_k x[r, k] * W[j, k] for r < rows,
// j < n, with W packed in panels. x and y are row-major with strides ldx, ldy.
// Each panel (k_len * 32 bytes) stays in the L1 cache while every row tile of
// x passes over it, so the weights are read from memory once per call.
void gemm_panels(const float* __restrict x, int64_t ldx, int64_t rows, int64_t k_len, const float* panels,
                 int64_t n, const float* bias, float* __restrict y, int64_t ldy) {
  const int64_t num_panels = (n + kHeadPanel - 1) / kHeadPanel;
  for (int64_t p = 0; p < num_panels; ++p) {
    const float* panel = panels + p * k_len * kHeadPanel;
    const int64_t col0 = p * kHeadPanel;
    const int64_t cols = std::min<int64_t>(kHeadPanel, n - col0);
    const float* b = bias ? bias + col0 : nullptr;
    int64_t r0 = 0;
    for (; r0 + kKernelRows <= rows; r0 += kKernelRows)
      panel_kernel<kKernelRows>(x + r0 * ldx, ldx, k_len, panel, b, y + r0 * ldy + col0, ldy, cols);
    switch (rows - r0) {
      case 3: panel_kernel<3>(x + r0 * ldx, ldx, k_len, panel, b, y + r0 * ldy + col0, ldy, cols); break;
      case 2: panel_kernel<2>(x + r0 * ldx, ldx, k_len, panel, b, y + r0 * ldy + col0, ldy, cols); break;
      case 1: panel_kernel<1>(x + r0 * ldx, ldx, k_len, panel, b, y + r0 * ldy + col0, ldy, cols); break;
      default: break;
    }
  }
}

// out[i] = v[i] / sqrt(mean(v^2) + eps) * g[i]; the mean is summed in double
// so that its rounding does not depend on H.
inline void rmsnorm(const float* v, const float* g, int64_t h, float eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < h; ++i) ss += static_cast<double>(v[i]) * v[i];
  const double mean = ss / static_cast<double>(h);
  const float inv = static_cast<float>(1.0 / std::sqrt(mean + static_cast<double>(eps)));
  for (int64_t i = 0; i < h; ++i) out[i] = v[i] * inv * g[i];
}

}  // namespace

const char* head_tensor_name(int32_t t) {
  return t >= 0 && t < kNumHeadTensors ? kNames[t] : "unknown";
}

Status DraftHead::init(const HeadConfig& c, const float* embed) {
  if (ready_) return Status::Invalid("the draft head is already initialised");
  // Why these caps: beyond them H * 2H floats or Vd * H floats of one matrix
  // pass 2^31 elements, which no draft head needs.
  if (c.hidden < 1 || c.hidden > 32768)
    return Status::Invalid("hidden must be in [1, 32768], got " + std::to_string(c.hidden));
  if (c.intermediate < 1 || c.intermediate > 131072)
    return Status::Invalid("intermediate must be in [1, 131072], got " + std::to_string(c.intermediate));
  if (c.vocab < 1) return Status::Invalid("vocab must be >= 1, got " + std::to_string(c.vocab));
  if (c.draft_vocab < 1 || c.draft_vocab > c.vocab)
    return Status::Invalid("draft_vocab must be in [1, vocab = " + std::to_string(c.vocab) + "], got " +
                           std::to_string(c.draft_vocab));
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps))
    return Status::Invalid("eps must be a positive finite number, got " + std::to_string(c.eps));
  if (embed == nullptr) return Status::Invalid("embed is null");
  config_ = c;
  embed_ = embed;
  ready_ = true;
  return Status::Ok();
}

Status DraftHead::push(const HeadWeightsRef& in, double metric, int64_t* version) {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (version == nullptr) return Status::Invalid("version is null");
  const HeadConfig& c = config_;
  // Shapes first: nothing is read before every size is known to be right.
  for (int32_t t = 0; t < kNumHeadTensors; ++t) {
    const HeadTensorRef& r = in.tensors[t];
    const Shape s = expected_shape(c, t);
    if (r.data == nullptr) return Status::Invalid(std::string("missing tensor '") + kNames[t] + "'");
    const bool ok = r.ndim == s.ndim && r.shape[0] == s.d0 && (s.ndim == 1 || r.shape[1] == s.d1);
    if (!ok)
      return Status::Invalid(std::string(kNames[t]) + " must have shape " + s.text + " = " +
                             shape_text(s.ndim, s.d0, s.d1) + ", got " + shape_text(r));
  }
  if (in.draft_ids == nullptr)
    return Status::Invalid(std::string("missing tensor '") + kHeadDraftIdsName + "'");
  if (in.num_draft_ids != c.draft_vocab)
    return Status::Invalid(std::string(kHeadDraftIdsName) + " must have shape (Vd,) = (" +
                           std::to_string(c.draft_vocab) + ",), got (" + std::to_string(in.num_draft_ids) +
                           ",)");

  auto w = std::make_shared<HeadWeights>();
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  const HeadTensorRef* t = in.tensors;
  ATLAS_RETURN_IF_ERROR(pack_panels(kNames[kHeadWIn], t[kHeadWIn].data, H, 2 * H, &w->w_in_));
  ATLAS_RETURN_IF_ERROR(pack_panels(kNames[kHeadWGate], t[kHeadWGate].data, I, H, &w->w_gate_));
  ATLAS_RETURN_IF_ERROR(pack_panels(kNames[kHeadWUp], t[kHeadWUp].data, I, H, &w->w_up_));
  ATLAS_RETURN_IF_ERROR(pack_panels(kNames[kHeadWDown], t[kHeadWDown].data, H, I, &w->w_down_));
  ATLAS_RETURN_IF_ERROR(pack_panels(kNames[kHeadWOut], t[kHeadWOut].data, V, H, &w->w_out_));
  ATLAS_RETURN_IF_ERROR(copy_vector(kNames[kHeadBIn], t[kHeadBIn].data, H, &w->b_in_));
  ATLAS_RETURN_IF_ERROR(copy_vector(kNames[kHeadNorm1], t[kHeadNorm1].data, H, &w->norm1_));
  ATLAS_RETURN_IF_ERROR(copy_vector(kNames[kHeadNorm2], t[kHeadNorm2].data, H, &w->norm2_));

  w->draft_ids_.assign(in.draft_ids, in.draft_ids + V);
  for (int64_t j = 0; j < V; ++j) {
    const int32_t id = w->draft_ids_[static_cast<size_t>(j)];
    if (id < 0 || id >= c.vocab)
      return Status::Invalid(std::string(kHeadDraftIdsName) + "[" + std::to_string(j) + "] = " +
                             std::to_string(id) + " is outside the vocabulary [0, " +
                             std::to_string(c.vocab) + ")");
  }
  std::vector<int32_t> sorted = w->draft_ids_;
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end())
    return Status::Invalid(std::string(kHeadDraftIdsName) + " lists token " + std::to_string(*dup) +
                           " twice: each draft row must map to a distinct token");

  std::lock_guard<std::mutex> lock(mu_);
  w->version_ = next_version_++;
  *version = w->version_;
  live_ = std::move(w);
  history_.push_back({*version, metric});
  if (history_.size() > static_cast<size_t>(kMaxHeadHistory)) history_.erase(history_.begin());
  return Status::Ok();
}

Status DraftHead::set_metric(int64_t version, double metric) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& h : history_) {
    if (h.version == version) {
      h.metric = metric;
      return Status::Ok();
    }
  }
  return Status::Invalid("version " + std::to_string(version) + " is not in the history (pushed versions: " +
                         (history_.empty() ? std::string("none")
                                           : std::to_string(history_.front().version) + ".." +
                                                 std::to_string(history_.back().version)) + ")");
}

std::shared_ptr<const HeadWeights> DraftHead::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_;
}

int64_t DraftHead::version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_ ? live_->version_ : 0;
}

std::vector<HeadVersionRecord> DraftHead::history() const {
  std::lock_guard<std::mutex> lock(mu_);
  return history_;
}

int64_t DraftHead::workspace_floats() const {
  return static_cast<int64_t>(kHeadRowTile) * (4 * static_cast<int64_t>(config_.hidden) +
                                              2 * static_cast<int64_t>(config_.intermediate));
}

Status DraftHead::forward(const HeadWeights* w, const float* features, int64_t feature_stride,
                          const int32_t* tokens, int64_t n, float* f_hat_out, float* logits_out,
                          float* workspace, int64_t workspace_floats) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (w == nullptr) return Status::Invalid("no weights: push a version before the first forward");
  if (n < 0) return Status::Invalid("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return Status::Ok();
  const HeadConfig& c = config_;
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  if (features == nullptr || tokens == nullptr || f_hat_out == nullptr || logits_out == nullptr)
    return Status::Invalid("features, tokens, f_hat_out and logits_out must not be null");
  if (feature_stride < H)
    return Status::Invalid("feature_stride must be >= hidden = " + std::to_string(H) + ", got " +
                           std::to_string(feature_stride));
  if (workspace == nullptr || workspace_floats < this->workspace_floats())
    return Status::Invalid("workspace must hold " + std::to_string(this->workspace_floats()) +
                           " floats, got " + std::to_string(workspace == nullptr ? 0 : workspace_floats));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab)
      return Status::Invalid("tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                             " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");

  const int64_t T = kHeadRowTile;
  float* xcat = workspace;       // [T, 2H]  [f ; e]
  float* z = xcat + T * 2 * H;   // [T, H]
  float* nrm = z + T * H;        // [T, H]   n, then h once n is spent
  float* gate = nrm + T * H;     // [T, I]   W_gate n, then silu(.) * up
  float* up = gate + T * I;      // [T, I]
  const float eps = c.eps;
  for (int64_t r0 = 0; r0 < n; r0 += T) {
    const int64_t rows = std::min(T, n - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* f = features + (r0 + r) * feature_stride;
      const float* e = embed_ + static_cast<int64_t>(tokens[r0 + r]) * H;
      std::copy(f, f + H, xcat + r * 2 * H);
      std::copy(e, e + H, xcat + r * 2 * H + H);
    }
    gemm_panels(xcat, 2 * H, rows, 2 * H, w->w_in_.data(), H, w->b_in_.data(), z, H);
    for (int64_t r = 0; r < rows; ++r) rmsnorm(z + r * H, w->norm1_.data(), H, eps, nrm + r * H);
    gemm_panels(nrm, H, rows, H, w->w_gate_.data(), I, nullptr, gate, I);
    gemm_panels(nrm, H, rows, H, w->w_up_.data(), I, nullptr, up, I);
    for (int64_t i = 0; i < rows * I; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    float* h = nrm;
    gemm_panels(gate, I, rows, I, w->w_down_.data(), H, nullptr, h, H);
    float* f_hat = f_hat_out + r0 * H;
    for (int64_t r = 0; r < rows; ++r) {
      float* hr = h + r * H;
      const float* zr = z + r * H;
      for (int64_t i = 0; i < H; ++i) hr[i] += zr[i];
      rmsnorm(hr, w->norm2_.data(), H, eps, f_hat + r * H);
    }
    gemm_panels(f_hat, H, rows, H, w->w_out_.data(), V, nullptr, logits_out + r0 * V, V);
  }
  return Status::Ok();
}

}  // namespace atlas
