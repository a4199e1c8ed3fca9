// The one file that includes pybind11. It validates every argument that comes
// from Python (type, dtype, device, shape, strides, writability), calls the
// native core, and turns every error value into a Python exception. Tensors
// cross without copies: numpy arrays through the buffer protocol, torch
// tensors (and anything else with __dlpack__) through DLPack.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "atlas/attention.h"
#include "atlas/common.h"
#include "atlas/cpu.h"
#include "atlas/head.h"
#include "atlas/kv_cache.h"
#include "atlas/suffix.h"
#include "atlas/tree.h"
#include "atlas/verify.h"
#include "atlas/linear.h"
#include "atlas/layer_ops.h"
#include "atlas/pool.h"

namespace py = pybind11;

namespace {

// ---- errors ------------------------------------------------------------------

struct CacheFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void throw_if_error(const atlas::Status& st) {
  if (st.ok()) return;
  switch (st.code) {
    case atlas::Code::kInvalidArgument:
      throw py::value_error(st.message);
    case atlas::Code::kCacheFull:
      throw CacheFullError(st.message);
    case atlas::Code::kUnsupported:
      throw py::type_error(st.message);
    default:
      throw std::runtime_error(st.message);
  }
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// Runs f (returning an atlas::Status) without the GIL, then raises its error.
template <typename F>
void call_nogil(F f) {
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    st = f();
  }
  throw_if_error(st);
}

// ---- DLPack (the ABI is a published standard; only the fields we read) --------

struct DLDevice {
  int32_t device_type;  // 1 = CPU, 2 = CUDA, 3 = CUDA host
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 6 bool
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null = compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

// ---- a borrowed view of an array-like argument ----------------------------------

enum class Elem { kF32, kBF16, kF16, kF64, kI32, kI64, kU8, kBool, kOther };

const char* elem_name(Elem e) {
  switch (e) {
    case Elem::kF32: return "float32";
    case Elem::kBF16: return "bfloat16";
    case Elem::kF16: return "float16";
    case Elem::kF64: return "float64";
    case Elem::kI32: return "int32";
    case Elem::kI64: return "int64";
    case Elem::kU8: return "uint8";
    case Elem::kBool: return "bool";
    default: return "an unsupported dtype";
  }
}

int64_t elem_size(Elem e) {
  switch (e) {
    case Elem::kF32: case Elem::kI32: return 4;
    case Elem::kBF16: case Elem::kF16: return 2;
    case Elem::kF64: case Elem::kI64: return 8;
    default: return 1;
  }
}

struct View {
  std::string name;
  py::object keep;  // the numpy array or the DLPack capsule: alive while the view is
  void* data = nullptr;
  Elem elem = Elem::kOther;
  bool on_cuda = false;
  int32_t device_id = 0;
  bool writeable = true;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  std::string shape_str() const {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    if (shape.size() == 1) os << ",";
    os << ")";
    return os.str();
  }
  bool contiguous() const {
    if (numel() == 0) return true;  // numpy gives empty arrays stride 0
    int64_t expect = 1;
    for (int64_t i = ndim() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }

  View& dtype(std::initializer_list<Elem> allowed) {
    for (Elem e : allowed) if (e == elem) return *this;
    std::string list;
    for (Elem e : allowed) list += std::string(list.empty() ? "" : " or ") + elem_name(e);
    fail(name + " must have dtype " + list + ", got " + elem_name(elem));
  }
  View& dims(int64_t n) {
    if (ndim() != n) fail(name + " must be " + std::to_string(n) + "-D, got shape " + shape_str());
    return *this;
  }
  View& dim(int64_t i, int64_t size, const char* what) {
    if (shape[i] != size)
      fail(name + " must have shape[" + std::to_string(i) + "] == " + what + " = " + std::to_string(size) +
           ", got shape " + shape_str());
    return *this;
  }
  View& cpu() {
    if (on_cuda) fail(name + " must be in CPU memory, got a CUDA tensor");
    return *this;
  }
  View& dense() {
    if (!contiguous()) fail(name + " must be contiguous (call .contiguous() / np.ascontiguousarray)");
    return *this;
  }
  View& inner_dense() {
    if (ndim() >= 1 && numel() > 0 && shape.back() > 1 && strides.back() != 1)
      fail(name + " must be contiguous in its last dimension");
    return *this;
  }
  View& output() {
    if (!writeable) fail(name + " is an output and must be writeable");
    return *this;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// A DLPack capsule of a plain CPU torch tensor, made the way its __dlpack__
// would make it (torch._C._to_dlpack) without that Python method's checks and
// stream handling, which cost about 3 microseconds a call against 0.5 (a
// forward of the target passes some 300 tensors to native calls); a null
// object for anything else, which then goes through __dlpack__ and its errors
// (a tensor that requires grad, a conjugate view, a sparse layout, a tensor
// subclass, CUDA streams). The torch objects are looked up once torch is
// imported and kept for the life of the process.
py::object fast_torch_capsule(py::handle obj) {
  static PyObject* tensor_type = nullptr;
  static PyObject* strided = nullptr;
  static PyObject* to_dlpack = nullptr;
  if (tensor_type == nullptr) {
    PyObject* modules = PyImport_GetModuleDict();  // borrowed
    PyObject* torch = PyDict_GetItemString(modules, "torch");
    PyObject* torch_c = PyDict_GetItemString(modules, "torch._C");
    if (torch == nullptr || torch_c == nullptr) return py::object();
    py::object tensor = py::getattr(torch, "Tensor", py::none());
    py::object layout = py::getattr(torch, "strided", py::none());
    py::object fn = py::getattr(torch_c, "_to_dlpack", py::none());
    if (tensor.is_none() || layout.is_none() || fn.is_none()) return py::object();
    strided = layout.release().ptr();
    to_dlpack = fn.release().ptr();
    tensor_type = tensor.release().ptr();
  }
  if (Py_TYPE(obj.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type)) return py::object();
  if (obj.attr("requires_grad").cast<bool>() || !obj.attr("is_cpu").cast<bool>() ||
      obj.attr("layout").ptr() != strided || obj.attr("is_conj")().cast<bool>())
    return py::object();
  return py::reinterpret_borrow<py::object>(to_dlpack)(obj);
}

View view_of(py::handle obj, const std::string& name) {
  View v;
  v.name = name;
  if (obj.is_none()) fail(name + " must be an array, got None");
  if (py::isinstance<py::array>(obj)) {
    py::array arr = py::reinterpret_borrow<py::array>(obj);
    py::dtype dt = arr.dtype();
    char kind = dt.kind();
    int64_t size = static_cast<int64_t>(dt.itemsize());
    if (kind == 'f' && size == 4) v.elem = Elem::kF32;
    else if (kind == 'f' && size == 2) v.elem = Elem::kF16;
    else if (kind == 'f' && size == 8) v.elem = Elem::kF64;
    else if (kind == 'i' && size == 4) v.elem = Elem::kI32;
    else if (kind == 'i' && size == 8) v.elem = Elem::kI64;
    else if (kind == 'u' && size == 1) v.elem = Elem::kU8;
    else if (kind == 'b') v.elem = Elem::kBool;
    if (!dt.attr("isnative").cast<bool>()) fail(name + " must be in native byte order");
    v.keep = arr;
    v.writeable = arr.writeable();
    v.data = const_cast<void*>(arr.data());
    for (py::ssize_t i = 0; i < arr.ndim(); ++i) {
      v.shape.push_back(arr.shape(i));
      if (arr.strides(i) % size != 0) fail(name + " has strides that are not a multiple of its item size");
      v.strides.push_back(arr.strides(i) / size);
    }
    return v;
  }
  py::object capsule = fast_torch_capsule(obj);
  if (!capsule) {
    if (!py::hasattr(obj, "__dlpack__"))
      fail(name + " must be a numpy array or a torch tensor, got " + std::string(py::str(py::type::of(obj))));
    try {
      capsule = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      fail(name + " cannot be shared without a copy: " + std::string(e.what()));
    }
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    fail(name + ": __dlpack__ did not return a DLPack tensor capsule");
  }
  const DLTensor& t = managed->dl_tensor;
  v.keep = capsule;  // not consumed: the producer frees its side when the capsule dies
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  if (t.device.device_type == 2) v.on_cuda = true;
  else if (t.device.device_type != 1 && t.device.device_type != 3)
    fail(name + " must live in CPU or CUDA memory");
  v.device_id = t.device.device_id;
  if (t.dtype.lanes != 1) fail(name + " must not be a vector dtype");
  if (t.dtype.code == 2 && t.dtype.bits == 32) v.elem = Elem::kF32;
  else if (t.dtype.code == 2 && t.dtype.bits == 16) v.elem = Elem::kF16;
  else if (t.dtype.code == 2 && t.dtype.bits == 64) v.elem = Elem::kF64;
  else if (t.dtype.code == 4 && t.dtype.bits == 16) v.elem = Elem::kBF16;
  else if (t.dtype.code == 0 && t.dtype.bits == 32) v.elem = Elem::kI32;
  else if (t.dtype.code == 0 && t.dtype.bits == 64) v.elem = Elem::kI64;
  else if (t.dtype.code == 1 && t.dtype.bits == 8) v.elem = Elem::kU8;
  else if (t.dtype.code == 6 || (t.dtype.code == 1 && t.dtype.bits == 1)) v.elem = Elem::kBool;
  int64_t expect = 1;
  v.shape.assign(t.shape, t.shape + t.ndim);
  v.strides.resize(t.ndim);
  for (int32_t i = t.ndim - 1; i >= 0; --i) {
    v.strides[i] = t.strides ? t.strides[i] : expect;
    expect *= t.shape[i];
  }
  return v;
}

bool ranges_overlap(const View& a, int64_t a_bytes, const View& b, int64_t b_bytes) {
  const char* pa = static_cast<const char*>(a.data);
  const char* pb = static_cast<const char*>(b.data);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + b_bytes && pb < pa + a_bytes;
}

// Optional array: None -> a view with no data.
View optional_view(py::handle obj, const std::string& name) {
  if (obj.is_none()) {
    View v;
    v.name = name;
    return v;
  }
  return view_of(obj, name);
}

int64_t checked_int(py::handle obj, const char* name, int64_t lo, int64_t hi) {
  if (!py::isinstance<py::int_>(obj) || py::isinstance<py::bool_>(obj))
    fail(std::string(name) + " must be an int, got " + std::string(py::str(py::type::of(obj))));
  int64_t v;
  try {
    v = obj.cast<int64_t>();
  } catch (py::cast_error&) {
    fail(std::string(name) + " is out of range");
  }
  if (v < lo || v > hi)
    fail(std::string(name) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(v));
  return v;
}

// ---- build info ----------------------------------------------------------------

py::dict build_info() {
  py::dict d;
  d["version"] = ATLAS_VERSION;
  d["compiler"] = ATLAS_CXX_COMPILER;
  d["build_type"] = ATLAS_BUILD_TYPE;
  d["simd_flags"] = ATLAS_SIMD;
#ifdef ATLAS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  std::vector<std::string> archs;
  std::string s = ATLAS_CUDA_ARCHS;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find_first_of(",;", start);
    if (end == std::string::npos) end = s.size();
    if (end > start) archs.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  d["cuda_archs"] = archs;
  return d;
}

void set_helper_cpus(py::handle cpus) {
  if (!py::isinstance<py::iterable>(cpus) || py::isinstance<py::str>(cpus))
    fail("cpus must be an iterable of CPU numbers (ints)");
  std::vector<int32_t> v;
  for (py::handle c : py::reinterpret_borrow<py::iterable>(cpus)) {
    if (py::isinstance<py::bool_>(c) || !py::isinstance<py::int_>(c))
      fail("cpus must hold ints, got " + std::string(py::str(py::type::of(c).attr("__name__"))));
    const long long x = c.cast<long long>();
    if (x < 0 || x > atlas::kMaxHelperCpu)
      fail("helper CPU " + std::to_string(x) + " is outside [0, " + std::to_string(atlas::kMaxHelperCpu) + "]");
    v.push_back(static_cast<int32_t>(x));
  }
  throw_if_error(atlas::set_helper_cpus(v));
}

py::dict cpu_features() {
  py::dict d;
  const atlas::cpu::Features& f = atlas::cpu::features();
  d["avx2_fma"] = f.avx2_fma;
  d["avx512f"] = f.avx512f;
  d["avx512_bf16"] = f.avx512_bf16;
  d["amx_bf16"] = f.amx_bf16;
  return d;
}

// ---- draft tree ------------------------------------------------------------------

atlas::DraftTree make_tree(int64_t root_token, int64_t max_nodes, int64_t vocab_size) {
  atlas::DraftTree t;
  throw_if_error(t.init(static_cast<int32_t>(root_token), static_cast<int32_t>(max_nodes),
                        static_cast<int32_t>(vocab_size)));
  return t;
}

template <typename T, typename F>
py::array_t<T> node_field(const atlas::DraftTree& t, F f) {
  py::array_t<T> out(t.size());
  auto* p = out.mutable_data();
  for (int32_t i = 0; i < t.size(); ++i) p[i] = f(t.node(i));
  return out;
}

// ---- KV cache --------------------------------------------------------------------

// The binding's KV cache: the native metadata plus a reference to the storage's
// owner so that the storage outlives the cache. The mutex makes each method
// atomic when Python threads share a cache.
struct KVCache {
  atlas::PagedKVCache cache;
  View storage;
  mutable std::mutex mu;
};

std::unique_ptr<KVCache> make_kv_cache(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim,
                                       int64_t num_blocks, int64_t block_size, int64_t max_seqs,
                                       py::handle storage) {
  auto kv = std::make_unique<KVCache>();
  atlas::KVCacheConfig c;
  c.num_layers = static_cast<int32_t>(num_layers);
  c.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  c.head_dim = static_cast<int32_t>(head_dim);
  c.num_blocks = static_cast<int32_t>(num_blocks);
  c.block_size = static_cast<int32_t>(block_size);
  c.max_seqs = static_cast<int32_t>(max_seqs);
  kv->storage = view_of(storage, "storage");
  View& s = kv->storage;
  s.dtype({Elem::kF32, Elem::kBF16}).dims(6).dense().output();
  c.dtype = s.elem == Elem::kF32 ? atlas::DType::kFloat32 : atlas::DType::kBFloat16;
  const int64_t expect[6] = {num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim};
  const char* names[6] = {"num_layers", "2", "num_blocks", "block_size", "num_kv_heads", "head_dim"};
  for (int i = 0; i < 6; ++i) s.dim(i, expect[i], names[i]);
  throw_if_error(kv->cache.init(c, s.data, s.numel() * elem_size(s.elem), !s.on_cuda));
  return kv;
}

void check_seq_arg(py::handle seq) { checked_int(seq, "seq", 0, std::numeric_limits<int32_t>::max()); }

// ---- verify ------------------------------------------------------------------------

// Per-sequence parameter: a Python scalar (broadcast) or a 1-D array of length batch.
template <typename T>
std::vector<T> per_seq(py::handle obj, const char* name, int64_t batch) {
  std::vector<T> out(static_cast<size_t>(batch));
  if (py::isinstance<py::int_>(obj) || py::isinstance<py::float_>(obj)) {
    T v;
    try {
      v = obj.cast<T>();
    } catch (py::cast_error&) {
      fail(std::string(name) + " is out of range for its type");
    }
    for (auto& x : out) x = v;
    return out;
  }
  py::array_t<T, py::array::forcecast> arr;
  try {
    arr = py::array_t<T, py::array::forcecast>::ensure(obj);
  } catch (py::error_already_set&) {
    arr = py::array_t<T, py::array::forcecast>();
  }
  if (!arr || arr.ndim() != 1 || arr.shape(0) != batch)
    fail(std::string(name) + " must be a number or a 1-D array of length batch = " + std::to_string(batch));
  for (int64_t i = 0; i < batch; ++i) out[static_cast<size_t>(i)] = arr.at(i);
  return out;
}

void verify(py::handle logits_obj, py::handle tokens_obj, py::handle parents_obj, py::handle offsets_obj,
            py::handle temperature, py::handle top_k, py::handle top_p, py::handle seed, py::handle offset,
            py::handle draft_obj, py::handle accepted_obj, py::handle emitted_obj, py::handle num_obj,
            py::handle workspace_obj) {
  View logits = view_of(logits_obj, "logits");
  logits.dtype({Elem::kF32, Elem::kBF16}).dims(2).cpu().inner_dense();
  View tokens = view_of(tokens_obj, "tokens");
  tokens.dtype({Elem::kI32}).dims(1).cpu().dense();
  View parents = view_of(parents_obj, "parents");
  parents.dtype({Elem::kI32}).dims(1).cpu().dense();
  View offsets = view_of(offsets_obj, "tree_offsets");
  offsets.dtype({Elem::kI64}).dims(1).cpu().dense();
  const int64_t total = logits.shape[0];
  const int64_t vocab = logits.shape[1];
  if (vocab < 1) fail("logits must have at least one column (vocab >= 1), got shape " + logits.shape_str());
  tokens.dim(0, total, "logits.shape[0] (number of tree nodes)");
  parents.dim(0, total, "logits.shape[0] (number of tree nodes)");
  if (offsets.shape[0] < 2) fail("tree_offsets must hold batch + 1 >= 2 entries, got shape " + offsets.shape_str());
  const int64_t batch = offsets.shape[0] - 1;
  // The native verifier cannot see how many rows logits has: the offsets must cover exactly them.
  const int64_t* off = offsets.ptr<const int64_t>();
  if (off[0] != 0 || off[batch] != total)
    fail("tree_offsets must start at 0 and end at logits.shape[0] = " + std::to_string(total) + ", got " +
         std::to_string(off[0]) + " ... " + std::to_string(off[batch]));

  View draft = optional_view(draft_obj, "draft_probs");
  if (draft.data) draft.dtype({Elem::kF32}).dims(2).cpu().inner_dense().dim(0, total, "logits.shape[0]").dim(1, vocab, "vocab");

  View accepted = view_of(accepted_obj, "accepted_out");
  accepted.dtype({Elem::kI32}).dims(2).cpu().dense().output().dim(0, batch, "batch");
  const int64_t max_accept = accepted.shape[1];
  View emitted = view_of(emitted_obj, "emitted_out");
  emitted.dtype({Elem::kI32}).dims(2).cpu().dense().output().dim(0, batch, "batch").dim(1, max_accept + 1, "max_accept + 1");
  View num = view_of(num_obj, "num_accepted_out");
  num.dtype({Elem::kI32}).dims(1).cpu().dense().output().dim(0, batch, "batch");
  View ws = view_of(workspace_obj, "workspace");
  ws.dtype({Elem::kU8}).dims(1).cpu().dense().output();

  auto temps = per_seq<float>(temperature, "temperature", batch);
  auto ks = per_seq<int64_t>(top_k, "top_k", batch);
  auto ps = per_seq<float>(top_p, "top_p", batch);
  auto seeds = per_seq<uint64_t>(seed, "seed", batch);
  auto offs = per_seq<uint64_t>(offset, "offset", batch);
  std::vector<atlas::SamplingParams> params(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    if (ks[b] < 0 || ks[b] > std::numeric_limits<int32_t>::max())
      fail("top_k must be in [0, 2^31), got " + std::to_string(ks[b]));
    params[b] = {temps[b], static_cast<int32_t>(ks[b]), ps[b], seeds[b], offs[b]};
  }

  atlas::VerifyProblem p;
  p.logits = logits.data;
  p.logits_dtype = logits.elem == Elem::kF32 ? atlas::DType::kFloat32 : atlas::DType::kBFloat16;
  p.vocab = vocab;
  // The stride of a dimension of size 1 is arbitrary (torch keeps whatever the view had).
  p.logits_row_stride = total > 1 ? logits.strides[0] : vocab;
  p.draft_probs = draft.ptr<const float>();
  p.draft_row_stride = draft.data ? (total > 1 ? draft.strides[0] : vocab) : 0;
  p.tokens = tokens.ptr<const int32_t>();
  p.parents = parents.ptr<const int32_t>();
  p.tree_offsets = offsets.ptr<const int64_t>();
  p.batch = batch;
  p.params = params.data();
  p.max_accept = max_accept;
  p.accepted_out = accepted.ptr<int32_t>();
  p.emitted_out = emitted.ptr<int32_t>();
  p.num_accepted_out = num.ptr<int32_t>();
  p.workspace = ws.data;
  p.workspace_bytes = ws.numel();
  call_nogil([&] { return atlas::verify(p); });
}

// atlas::top_k_probs: the probabilities into values_obj, or the logits when logits_wanted.
void top_k(py::handle logits_obj, py::handle k_obj, py::handle ids_obj, py::handle values_obj,
           py::handle workspace_obj, bool logits_wanted) {
  View logits = view_of(logits_obj, "logits");
  logits.dtype({Elem::kF32, Elem::kBF16}).dims(2).cpu().inner_dense();
  const int64_t rows = logits.shape[0];
  const int64_t vocab = logits.shape[1];
  if (vocab < 1) fail("logits must have at least one column (vocab >= 1), got shape " + logits.shape_str());
  const int64_t k = checked_int(k_obj, "k", 1, vocab);
  View ids = view_of(ids_obj, "ids_out");
  ids.dtype({Elem::kI32}).dims(2).cpu().dense().output().dim(0, rows, "logits.shape[0]").dim(1, k, "k");
  View values = view_of(values_obj, logits_wanted ? "logits_out" : "probs_out");
  values.dtype({Elem::kF32}).dims(2).cpu().dense().output().dim(0, rows, "logits.shape[0]").dim(1, k, "k");
  View ws = view_of(workspace_obj, "workspace");
  ws.dtype({Elem::kU8}).dims(1).cpu().dense().output();
  atlas::TopKProblem p;
  p.logits = logits.data;
  p.logits_dtype = logits.elem == Elem::kF32 ? atlas::DType::kFloat32 : atlas::DType::kBFloat16;
  p.vocab = vocab;
  p.logits_row_stride = rows > 1 ? logits.strides[0] : vocab;
  p.rows = rows;
  p.k = static_cast<int32_t>(k);
  p.ids_out = ids.ptr<int32_t>();
  (logits_wanted ? p.logits_out : p.probs_out) = values.ptr<float>();
  p.workspace = ws.data;
  p.workspace_bytes = ws.numel();
  call_nogil([&] { return atlas::top_k_probs(p); });
}

// ---- small-batch linear layers ------------------------------------------------------------

std::unique_ptr<atlas::PackedLinear> make_packed_linear(py::handle weight_obj, const std::string& simd) {
  View w = view_of(weight_obj, "weight");
  w.dtype({Elem::kF32}).dims(2).cpu().inner_dense();
  if (simd != "auto" && simd != "avx2" && simd != "baseline")
    fail("simd must be 'auto', 'avx2' or 'baseline', got '" + simd + "'");
  auto lin = std::make_unique<atlas::PackedLinear>();
  const int64_t n = w.shape[0], k = w.shape[1];
  const int64_t stride = n > 1 ? w.strides[0] : k;
  call_nogil([&] { return lin->init(w.ptr<const float>(), n, k, stride, simd != "baseline", simd == "auto"); });
  return lin;
}

void packed_linear_forward(const atlas::PackedLinear& lin, py::handle x_obj, py::handle out_obj, py::handle bias_obj,
                           py::handle threads_obj) {
  const int64_t threads = checked_int(threads_obj, "threads", 1, atlas::kLinearMaxThreads);
  View x = view_of(x_obj, "x");
  x.dtype({Elem::kF32}).dims(2).cpu().inner_dense().dim(1, lin.in_features(), "in_features");
  const int64_t rows = x.shape[0];
  View out = view_of(out_obj, "out");
  out.dtype({Elem::kF32}).dims(2).cpu().inner_dense().output().dim(0, rows, "x.shape[0]")
      .dim(1, lin.out_features(), "out_features");
  View bias = optional_view(bias_obj, "bias");
  if (bias.data) bias.dtype({Elem::kF32}).dims(1).cpu().dense().dim(0, lin.out_features(), "out_features");
  const int64_t ldx = rows > 1 ? x.strides[0] : lin.in_features();
  const int64_t ldy = rows > 1 ? out.strides[0] : lin.out_features();
  if (rows > 1 && (ldx < lin.in_features() || ldy < lin.out_features()))
    fail("x and out must not have overlapping rows (row strides >= their widths)");
  if (ranges_overlap(out, rows * ldy * 4, x, rows * ldx * 4)) fail("out must not overlap x");
  call_nogil([&] {
    return lin.forward(x.ptr<const float>(), rows, ldx, bias.ptr<const float>(), out.ptr<float>(), ldy,
                       static_cast<int32_t>(threads));
  });
}

// ---- RMSNorm of a few rows --------------------------------------------------------------

void rms_norm_rows(py::handle x_obj, py::handle weight_obj, py::handle eps_obj, py::handle out_obj) {
  if (py::isinstance<py::bool_>(eps_obj) || !(py::isinstance<py::float_>(eps_obj) || py::isinstance<py::int_>(eps_obj)))
    fail("eps must be a float, got " + std::string(py::str(py::type::of(eps_obj))));
  const double eps = eps_obj.cast<double>();
  View x = view_of(x_obj, "x");
  x.dtype({Elem::kF32}).dims(2).cpu().inner_dense();
  const int64_t rows = x.shape[0], n = x.shape[1];
  if (n < 1) fail("x must have at least one column");
  View w = view_of(weight_obj, "weight");
  w.dtype({Elem::kF32}).dims(1).cpu().dense().dim(0, n, "x.shape[1]");
  View out = view_of(out_obj, "out");
  out.dtype({Elem::kF32}).dims(2).cpu().inner_dense().output().dim(0, rows, "x.shape[0]").dim(1, n, "x.shape[1]");
  const int64_t ldx = rows > 1 ? x.strides[0] : n;
  const int64_t ldy = rows > 1 ? out.strides[0] : n;
  if (rows > 1 && (ldx < n || ldy < n)) fail("x and out must not have overlapping rows (row strides >= their widths)");
  if (out.data == x.data) {
    if (ldx != ldy) fail("out may be x itself, but then with the same row stride");
  } else if (ranges_overlap(out, rows * ldy * 4, x, rows * ldx * 4)) {
    fail("out must be x itself or not overlap it");
  }
  if (ranges_overlap(out, rows * ldy * 4, w, n * 4)) fail("out must not overlap weight");
  if (!std::isfinite(eps) || eps <= 0.0 || eps > std::numeric_limits<float>::max())
    fail("eps must be a finite float32 > 0, got " + std::to_string(eps));
  call_nogil([&] {
    return atlas::rms_norm(x.ptr<const float>(), rows, ldx, n, w.ptr<const float>(), static_cast<float>(eps),
                           out.ptr<float>(), ldy);
  });
}

// ---- rotary embedding and the KV store -------------------------------------------------

void rope_store(const KVCache& kv, py::handle layer, py::handle qkv_obj, py::handle cos_obj, py::handle sin_obj,
                py::handle slots_obj, py::handle q_out_obj) {
  const auto& c = kv.cache.config();
  const int64_t lay = checked_int(layer, "layer", 0, c.num_layers - 1);
  if (c.dtype != atlas::DType::kFloat32 || kv.storage.on_cuda)
    fail("rope_store needs a float32 cache whose storage is in CPU memory");
  const int64_t d = c.head_dim, hk = c.num_kv_heads;
  View qkv = view_of(qkv_obj, "qkv");
  qkv.dtype({Elem::kF32}).dims(3).cpu().dim(2, d, "head_dim");
  const int64_t total = qkv.shape[0], hq = qkv.shape[1] - 2 * hk;
  if (hq < 1) fail("qkv.shape[1] must be the query heads + 2 * num_kv_heads (" + std::to_string(2 * hk) +
                   ") with at least one query head, got " + qkv.shape_str());
  const int64_t width = qkv.shape[1] * d;
  const int64_t ld = total > 1 ? qkv.strides[0] : width;
  if (ld < width) fail("qkv's rows must not overlap (row stride >= heads * head_dim)");
  if ((d > 1 && qkv.strides[2] != 1) || (qkv.shape[1] > 1 && qkv.strides[1] != d))
    fail("qkv must be contiguous within each row (heads of head_dim values side by side)");
  View cs = view_of(cos_obj, "cos");
  cs.dtype({Elem::kF32}).dims(2).cpu().dense().dim(0, total, "qkv.shape[0]").dim(1, d, "head_dim");
  View sn = view_of(sin_obj, "sin");
  sn.dtype({Elem::kF32}).dims(2).cpu().dense().dim(0, total, "qkv.shape[0]").dim(1, d, "head_dim");
  View slots = view_of(slots_obj, "slots");
  slots.dtype({Elem::kI64}).dims(1).cpu().dense().dim(0, total, "qkv.shape[0]");
  View q = view_of(q_out_obj, "q_out");
  q.dtype({Elem::kF32}).dims(3).cpu().dense().output().dim(0, total, "qkv.shape[0]").dim(1, hq, "query heads")
      .dim(2, d, "head_dim");
  const int64_t qkv_bytes = total > 0 ? ((total - 1) * ld + width) * 4 : 0;
  const int64_t storage_bytes = kv.storage.numel() * 4;
  const int64_t q_bytes = q.numel() * 4, table_bytes = total * d * 4;
  if (ranges_overlap(q, q_bytes, qkv, qkv_bytes) || ranges_overlap(q, q_bytes, cs, table_bytes) ||
      ranges_overlap(q, q_bytes, sn, table_bytes) || ranges_overlap(q, q_bytes, slots, total * 8))
    fail("q_out must not overlap qkv, cos, sin or slots");
  if (ranges_overlap(kv.storage, storage_bytes, qkv, qkv_bytes) ||
      ranges_overlap(kv.storage, storage_bytes, q, q_bytes) ||
      ranges_overlap(kv.storage, storage_bytes, cs, table_bytes) ||
      ranges_overlap(kv.storage, storage_bytes, sn, table_bytes))
    fail("qkv, q_out, cos and sin must not lie in the cache's storage");
  const int64_t capacity = static_cast<int64_t>(c.num_blocks) * c.block_size;
  float* base = kv.storage.ptr<float>();
  atlas::RopeStoreProblem p;
  p.qkv = qkv.ptr<const float>();
  p.total = total;
  p.ld_qkv = ld;
  p.num_q_heads = static_cast<int32_t>(hq);
  p.num_kv_heads = static_cast<int32_t>(hk);
  p.head_dim = static_cast<int32_t>(d);
  p.cos = cs.ptr<const float>();
  p.sin = sn.ptr<const float>();
  p.q_out = q.ptr<float>();
  p.keys = base + (lay * 2) * capacity * hk * d;
  p.values = base + (lay * 2 + 1) * capacity * hk * d;
  p.slots = slots.ptr<const int64_t>();
  p.capacity = capacity;
  call_nogil([&] { return atlas::rope_store(p); });
}

// ---- tree attention ------------------------------------------------------------------

void tree_attention(const KVCache& kv, py::handle layer, py::handle q_obj, py::handle out_obj,
                    py::handle seq_obj, py::handle qoff_obj, py::handle parents_obj, double scale,
                    py::handle threads_obj) {
  const auto& c = kv.cache.config();
  const int64_t threads = checked_int(threads_obj, "threads", 1, atlas::kPoolMaxThreads);
  const int64_t lay = checked_int(layer, "layer", 0, c.num_layers - 1);
  const Elem want = c.dtype == atlas::DType::kFloat32 ? Elem::kF32 : Elem::kBF16;
  View q = view_of(q_obj, "q");
  q.dtype({want}).dims(3).cpu().inner_dense().dim(2, c.head_dim, "head_dim");
  View out = view_of(out_obj, "out");
  out.dtype({want}).dims(3).cpu().dense().output().dim(0, q.shape[0], "q.shape[0]").dim(1, q.shape[1], "q.shape[1]").dim(2, c.head_dim, "head_dim");
  View seqs = view_of(seq_obj, "seq_ids");
  seqs.dtype({Elem::kI32}).dims(1).cpu().dense();
  View qoff = view_of(qoff_obj, "q_offsets");
  qoff.dtype({Elem::kI64}).dims(1).cpu().dense().dim(0, seqs.shape[0] + 1, "len(seq_ids) + 1");
  View parents = view_of(parents_obj, "parents");
  parents.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, q.shape[0], "q.shape[0]");
  if (kv.storage.on_cuda) fail("tree_attention on the CPU needs a cache whose storage is in CPU memory");
  // The core cannot see q's length: q_offsets must cover its rows exactly.
  {
    const int64_t* off = qoff.ptr<const int64_t>();
    const int64_t nb = seqs.shape[0];
    if (off[0] != 0) fail("q_offsets[0] must be 0, got " + std::to_string(off[0]));
    for (int64_t b = 0; b < nb; ++b)
      if (off[b + 1] < off[b])
        fail("q_offsets must be non-decreasing, but q_offsets[" + std::to_string(b + 1) + "] = " +
             std::to_string(off[b + 1]) + " < q_offsets[" + std::to_string(b) + "] = " +
             std::to_string(off[b]));
    if (off[nb] != q.shape[0])
      fail("q_offsets[-1] must equal q.shape[0] = " + std::to_string(q.shape[0]) + ", got " +
           std::to_string(off[nb]));
  }
  if (!(scale > 0.0) || !std::isfinite(scale)) fail("scale must be a positive finite number");
  if (q.shape[1] < 1 || q.shape[1] % c.num_kv_heads != 0)
    fail("q.shape[1] (query heads) must be a positive multiple of num_kv_heads = " + std::to_string(c.num_kv_heads));

  atlas::TreeAttentionProblem p;
  p.cache = &kv.cache;
  p.layer = static_cast<int32_t>(lay);
  p.q = q.data;
  p.q_stride_token = q.strides[0];
  p.q_stride_head = q.strides[1];
  p.num_q_heads = static_cast<int32_t>(q.shape[1]);
  p.out = out.data;
  p.seq_ids = seqs.ptr<const int32_t>();
  p.q_offsets = qoff.ptr<const int64_t>();
  p.parents = parents.ptr<const int32_t>();
  p.batch = seqs.shape[0];
  p.scale = static_cast<float>(scale);
  p.threads = static_cast<int32_t>(threads);
  atlas::Status st;
  {
    // GIL first, then the mutex: a thread that holds the mutex never waits for
    // the GIL, so a second thread calling into this cache cannot deadlock it.
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(kv.mu);
    st = atlas::tree_attention(p);
  }
  throw_if_error(st);
}

// ---- draft head (learned speculator) ---------------------------------------------------

// The binding's draft head: the native head, the embedding table's owner (the
// head borrows it, so the view keeps it alive as long as the head), and one
// workspace that forward calls share under a mutex. Held by shared_ptr so that
// a snapshot keeps its head alive.
struct PyDraftHead {
  atlas::DraftHead head;
  View embed;
  std::vector<float> workspace;
  std::mutex workspace_mu;
};

// One weight version, pinned: forwards through a snapshot all use it, however
// many pushes happen meanwhile (a decoding step takes one snapshot).
struct PyHeadSnapshot {
  std::shared_ptr<PyDraftHead> owner;
  std::shared_ptr<const atlas::HeadWeights> weights;
};

std::shared_ptr<PyDraftHead> make_draft_head(py::handle embed_obj, py::handle hidden, py::handle intermediate,
                                             py::handle draft_vocab, double eps, const std::string& simd) {
  auto h = std::make_shared<PyDraftHead>();
  atlas::HeadConfig c;
  c.hidden = static_cast<int32_t>(checked_int(hidden, "hidden", 1, 32768));
  c.intermediate = static_cast<int32_t>(checked_int(intermediate, "intermediate", 1, 131072));
  h->embed = view_of(embed_obj, "embed");
  View& e = h->embed;
  e.dtype({Elem::kF32}).dims(2).cpu().dense().dim(1, c.hidden, "hidden");
  if (e.shape[0] < 1 || e.shape[0] > std::numeric_limits<int32_t>::max())
    fail("embed must have between 1 and 2^31 - 1 rows (the vocabulary), got shape " + e.shape_str());
  c.vocab = static_cast<int32_t>(e.shape[0]);
  c.draft_vocab = static_cast<int32_t>(checked_int(draft_vocab, "draft_vocab", 1, c.vocab));
  if (!(eps > 0.0) || !std::isfinite(eps) || eps > 1.0)
    fail("eps must be in (0, 1], got " + std::to_string(eps));
  c.eps = static_cast<float>(eps);
  if (simd != "auto" && simd != "avx2" && simd != "baseline")
    fail("simd must be 'auto', 'avx2' or 'baseline', got '" + simd + "'");
  c.simd = simd == "auto" ? atlas::HeadSimd::kAuto
                          : (simd == "avx2" ? atlas::HeadSimd::kAvx2 : atlas::HeadSimd::kBaseline);
  throw_if_error(h->head.init(c, e.ptr<const float>()));
  h->workspace.assign(static_cast<size_t>(h->head.workspace_floats()), 0.0f);
  return h;
}

std::string head_names_list() {
  std::string s;
  for (int32_t t = 0; t < atlas::kNumHeadTensors; ++t)
    s += std::string(s.empty() ? "" : ", ") + atlas::head_tensor_name(t);
  return s + ", " + atlas::kHeadDraftIdsName;
}

// weights[name] as a float32 CPU array of 1 or 2 dimensions, described in
// *ref (its shape checks are the head's); the view keeps it alive.
View head_tensor_view(py::handle obj, const std::string& name, atlas::HeadTensorRef* ref) {
  View v = view_of(obj, "weights['" + name + "']");
  v.dtype({Elem::kF32}).cpu().dense();
  if (v.ndim() != 1 && v.ndim() != 2) fail(v.name + " must be 1-D or 2-D, got shape " + v.shape_str());
  ref->data = v.ptr<const float>();
  ref->ndim = static_cast<int32_t>(v.ndim());
  for (int64_t i = 0; i < v.ndim(); ++i) ref->shape[i] = v.shape[i];
  return v;
}

int64_t head_push(PyDraftHead& h, py::handle weights_obj, py::handle metric_obj) {
  if (!py::isinstance<py::dict>(weights_obj))
    fail("weights must be a dict of name -> array, got " + std::string(py::str(py::type::of(weights_obj))));
  py::dict d = py::reinterpret_borrow<py::dict>(weights_obj);
  for (auto item : d) {
    if (!py::isinstance<py::str>(item.first))
      fail("weights keys must be strings (" + head_names_list() + ")");
    const std::string key = item.first.cast<std::string>();
    bool known = key == atlas::kHeadDraftIdsName;
    for (int32_t t = 0; t < atlas::kNumHeadTensors && !known; ++t) known = key == atlas::head_tensor_name(t);
    if (!known)
      fail("weights has an unknown tensor '" + key + "' (expected exactly: " + head_names_list() + ")");
  }
  double metric = std::numeric_limits<double>::quiet_NaN();
  if (!metric_obj.is_none()) {
    if (!py::isinstance<py::float_>(metric_obj) && !py::isinstance<py::int_>(metric_obj))
      fail("metric must be a number or None, got " + std::string(py::str(py::type::of(metric_obj))));
    metric = metric_obj.cast<double>();
    if (!std::isfinite(metric)) fail("metric must be finite, got " + std::to_string(metric));
  }
  std::vector<View> views;  // keep every array alive while the GIL is released
  atlas::HeadWeightsRef ref;
  for (int32_t t = 0; t < atlas::kNumHeadTensors; ++t) {
    const std::string name = atlas::head_tensor_name(t);
    if (!d.contains(name))
      fail("weights is missing tensor '" + name + "' (expected exactly: " + head_names_list() + ")");
    views.push_back(head_tensor_view(d[name.c_str()], name, &ref.tensors[t]));
  }
  const std::string ids_name = atlas::kHeadDraftIdsName;
  if (!d.contains(ids_name))
    fail("weights is missing tensor '" + ids_name + "' (expected exactly: " + head_names_list() + ")");
  View ids = view_of(d[ids_name.c_str()], "weights['" + ids_name + "']");
  ids.dtype({Elem::kI32}).dims(1).cpu().dense();
  ref.draft_ids = ids.ptr<const int32_t>();
  ref.num_draft_ids = ids.shape[0];
  int64_t version = 0;
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    st = h.head.push(ref, metric, &version);
  }
  throw_if_error(st);
  return version;
}

// A request-local version of snapshot s with some float tensors replaced
// (atlas/head.h: DraftHead::derive).
PyHeadSnapshot head_derive(const PyHeadSnapshot& s, py::handle weights_obj) {
  if (!py::isinstance<py::dict>(weights_obj))
    fail("weights must be a dict of name -> array, got " + std::string(py::str(py::type::of(weights_obj))));
  py::dict d = py::reinterpret_borrow<py::dict>(weights_obj);
  if (d.size() == 0) fail("weights must name at least one tensor to replace");
  std::vector<View> views;  // keep every array alive while the GIL is released
  atlas::HeadWeightsRef ref;
  for (auto item : d) {
    if (!py::isinstance<py::str>(item.first))
      fail("weights keys must be strings (" + head_names_list() + ")");
    const std::string key = item.first.cast<std::string>();
    if (key == atlas::kHeadDraftIdsName)
      fail(std::string("a derived version keeps its base's ") + atlas::kHeadDraftIdsName +
           ": weights may hold float tensors only");
    int32_t t = 0;
    while (t < atlas::kNumHeadTensors && key != atlas::head_tensor_name(t)) ++t;
    if (t == atlas::kNumHeadTensors)
      fail("weights has an unknown tensor '" + key + "' (the float tensors are: " + head_names_list() + ")");
    views.push_back(head_tensor_view(item.second, key, &ref.tensors[t]));
  }
  std::shared_ptr<const atlas::HeadWeights> out;
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    st = s.owner->head.derive(s.weights.get(), ref, &out);
  }
  throw_if_error(st);
  return PyHeadSnapshot{s.owner, std::move(out)};
}

// Runs the head with one pinned version; returns that version's number.
int64_t head_forward(PyDraftHead& h, const std::shared_ptr<const atlas::HeadWeights>& w,
                     py::handle features_obj, py::handle tokens_obj, py::handle f_hat_obj,
                     py::handle logits_obj) {
  const auto& c = h.head.config();
  View f = view_of(features_obj, "features");
  f.dtype({Elem::kF32}).dims(2).cpu().inner_dense().dim(1, c.hidden, "hidden");
  const int64_t n = f.shape[0];
  View tok = view_of(tokens_obj, "tokens");
  tok.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, n, "features.shape[0]");
  View fo = view_of(f_hat_obj, "f_hat_out");
  fo.dtype({Elem::kF32}).dims(2).cpu().dense().output();
  fo.dim(0, n, "features.shape[0]").dim(1, c.hidden, "hidden");
  View lo = view_of(logits_obj, "logits_out");
  lo.dtype({Elem::kF32}).dims(2).cpu().dense().output();
  lo.dim(0, n, "features.shape[0]").dim(1, c.draft_vocab, "draft_vocab");
  if (!w) fail("the draft head has no weights yet: push a version first");
  if (n > 0 && f.strides[0] < c.hidden) fail("features rows must not overlap (row stride >= hidden)");
  const int64_t f_bytes = n > 0 ? ((n - 1) * f.strides[0] + c.hidden) * 4 : 0;
  const int64_t fo_bytes = n * c.hidden * 4, lo_bytes = n * static_cast<int64_t>(c.draft_vocab) * 4;
  if (ranges_overlap(fo, fo_bytes, f, f_bytes)) fail("f_hat_out must not overlap features");
  if (ranges_overlap(lo, lo_bytes, f, f_bytes)) fail("logits_out must not overlap features");
  if (ranges_overlap(lo, lo_bytes, fo, fo_bytes)) fail("logits_out must not overlap f_hat_out");
  if (ranges_overlap(fo, fo_bytes, tok, n * 4)) fail("f_hat_out must not overlap tokens");
  if (ranges_overlap(lo, lo_bytes, tok, n * 4)) fail("logits_out must not overlap tokens");
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(h.workspace_mu);
    st = h.head.forward(w.get(), f.ptr<const float>(), n > 0 ? f.strides[0] : c.hidden,
                        tok.ptr<const int32_t>(), n, fo.ptr<float>(), lo.ptr<float>(), h.workspace.data(),
                        static_cast<int64_t>(h.workspace.size()));
  }
  throw_if_error(st);
  return w->version();
}

// Why these: a call holds up to requests x width x topk candidates a depth
// (24 bytes each), so 2^24 of them over all depths is at most 400 MB, against
// a few hundred for the trees a step verifies; the bounds keep a mistaken
// call from asking for gigabytes.
constexpr int64_t kMaxDraftWidth = 1024;
constexpr int64_t kMaxDraftRows = 1 << 16;
constexpr int64_t kMaxDraftCandidates = 1 << 24;

py::tuple head_draft(PyHeadSnapshot& s, py::handle features_obj, py::handle tokens_obj, py::handle budgets_obj,
                     py::handle floors_obj, py::handle topk_obj, py::handle width_obj, py::handle depth_obj) {
  PyDraftHead& h = *s.owner;
  const auto& c = h.head.config();
  atlas::HeadDraftSettings st;
  // Bounds on what one call may hold: a frontier of requests x width rows of
  // H floats and their top-k candidates at each depth.
  st.topk = static_cast<int32_t>(checked_int(topk_obj, "topk", 1, kMaxDraftWidth));
  st.width = static_cast<int32_t>(checked_int(width_obj, "width", 1, kMaxDraftWidth));
  st.max_depth = static_cast<int32_t>(checked_int(depth_obj, "max_depth", 1, kMaxDraftWidth));
  View f = view_of(features_obj, "features");
  f.dtype({Elem::kF32}).dims(2).cpu().dense().dim(1, c.hidden, "hidden");
  const int64_t n = f.shape[0];
  if (n * st.width * st.topk * st.max_depth > kMaxDraftCandidates)
    fail("requests x width x topk x max_depth must be <= " + std::to_string(kMaxDraftCandidates) + ", got " +
         std::to_string(n) + " x " + std::to_string(st.width) + " x " + std::to_string(st.topk) + " x " +
         std::to_string(st.max_depth));
  View tok = view_of(tokens_obj, "tokens");
  tok.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, n, "features.shape[0]");
  View bud = view_of(budgets_obj, "budgets");
  bud.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, n, "features.shape[0]");
  View flo = view_of(floors_obj, "floors");
  flo.dtype({Elem::kF64}).dims(1).cpu().dense().dim(0, n, "features.shape[0]");
  std::vector<atlas::HeadDraftJob> jobs(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    auto& job = jobs[static_cast<size_t>(j)];
    job.feature = f.ptr<const float>() + j * c.hidden;
    job.token = tok.ptr<const int32_t>()[j];
    job.budget = bud.ptr<const int32_t>()[j];
    job.floor = flo.ptr<const double>()[j];
    if (job.token < 0 || job.token >= c.vocab)
      fail("tokens[" + std::to_string(j) + "] = " + std::to_string(job.token) + " is outside [0, " +
           std::to_string(c.vocab) + ")");
    if (job.budget < 1 || job.budget > kMaxDraftRows)
      fail("budgets[" + std::to_string(j) + "] must be in [1, " + std::to_string(kMaxDraftRows) + "], got " +
           std::to_string(job.budget));
    if (!(job.floor >= 0.0 && job.floor < 1.0))
      fail("floors[" + std::to_string(j) + "] must be in [0, 1), got " + std::to_string(job.floor));
  }
  std::vector<std::vector<atlas::HeadDraftNode>> out;
  atlas::Status status;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(h.workspace_mu);
    status = h.head.draft(s.weights.get(), jobs.data(), n, st, &out, h.workspace.data(),
                          static_cast<int64_t>(h.workspace.size()));
  }
  throw_if_error(status);
  int64_t total = 0;
  for (const auto& o : out) total += static_cast<int64_t>(o.size());
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(n + 1));
  py::array_t<int32_t> parents(static_cast<py::ssize_t>(total)), tokens(static_cast<py::ssize_t>(total));
  py::array_t<float> probs(static_cast<py::ssize_t>(total));
  int64_t* off = offsets.mutable_data();
  int32_t* par = parents.mutable_data();
  int32_t* tk = tokens.mutable_data();
  float* pr = probs.mutable_data();
  int64_t at = 0;
  off[0] = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (const auto& node : out[static_cast<size_t>(j)]) {
      par[at] = node.parent;
      tk[at] = node.token;
      pr[at] = node.prob;
      ++at;
    }
    off[j + 1] = at;
  }
  return py::make_tuple(offsets, parents, tokens, probs);
}

py::array_t<float> head_snapshot_tensor(const PyHeadSnapshot& s, py::handle name_obj) {
  if (!py::isinstance<py::str>(name_obj))
    fail("name must be a str, got " + std::string(py::str(py::type::of(name_obj))));
  const std::string name = name_obj.cast<std::string>();
  int32_t t = 0;
  while (t < atlas::kNumHeadTensors && name != atlas::head_tensor_name(t)) ++t;
  if (t == atlas::kNumHeadTensors) {
    std::string names;
    for (int32_t i = 0; i < atlas::kNumHeadTensors; ++i)
      names += std::string(names.empty() ? "" : ", ") + atlas::head_tensor_name(i);
    fail("unknown tensor '" + name + "' (the float tensors are: " + names + ")");
  }
  const auto& c = s.owner->head.config();
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  std::vector<py::ssize_t> shape;
  switch (t) {
    case atlas::kHeadWIn: shape = {H, 2 * H}; break;
    case atlas::kHeadWGate: case atlas::kHeadWUp: shape = {I, H}; break;
    case atlas::kHeadWDown: shape = {H, I}; break;
    case atlas::kHeadWOut: shape = {V, H}; break;
    default: shape = {H}; break;
  }
  py::array_t<float> out(shape);
  throw_if_error(s.owner->head.read_tensor(s.weights.get(), t, out.mutable_data(), out.size()));
  return out;
}

py::list head_history(const PyDraftHead& h) {
  py::list out;
  for (const auto& r : h.head.history())
    out.append(py::make_tuple(r.version, std::isnan(r.metric) ? py::object(py::none())
                                                               : py::object(py::float_(r.metric))));
  return out;
}

// ---- suffix speculator ------------------------------------------------------------------

// Token ids from a 1-D integer numpy array or any iterable of ints (a list,
// a tuple, a torch tensor's elements). Values must fit int32; the native side
// checks them against the vocabulary.
std::vector<int32_t> token_ids(py::handle obj, const std::string& name) {
  std::vector<int32_t> out;
  if (obj.is_none()) fail(name + " must be a sequence of token ids, got None");
  if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj))
    fail(name + " must be a sequence of token ids, got " + std::string(py::str(py::type::of(obj))));
  auto push = [&](int64_t v, size_t i) {
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      fail(name + "[" + std::to_string(i) + "] = " + std::to_string(v) + " does not fit int32");
    out.push_back(static_cast<int32_t>(v));
  };
  if (py::isinstance<py::array>(obj)) {
    py::array arr = py::reinterpret_borrow<py::array>(obj);
    const char kind = arr.dtype().kind();
    if (kind != 'i' && kind != 'u')
      fail(name + " must hold integers, got dtype " + std::string(py::str(arr.dtype())));
    if (arr.ndim() != 1) fail(name + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
    if (kind == 'u' && arr.dtype().itemsize() == 8) {
      auto a = py::array_t<uint64_t, py::array::forcecast>::ensure(arr);
      if (!a) fail(name + " could not be read as uint64");
      for (py::ssize_t i = 0; i < a.shape(0); ++i) {
        const uint64_t v = a.at(i);
        if (v > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
          fail(name + "[" + std::to_string(i) + "] = " + std::to_string(v) + " does not fit int32");
        out.push_back(static_cast<int32_t>(v));
      }
      return out;
    }
    auto a = py::array_t<int64_t, py::array::forcecast>::ensure(arr);
    if (!a) fail(name + " could not be read as int64");
    out.reserve(static_cast<size_t>(a.shape(0)));
    for (py::ssize_t i = 0; i < a.shape(0); ++i) push(a.at(i), static_cast<size_t>(i));
    return out;
  }
  py::iterator it;
  try {
    it = py::iter(obj);
  } catch (py::error_already_set&) {
    fail(name + " must be a sequence of token ids, got " + std::string(py::str(py::type::of(obj))));
  }
  size_t i = 0;
  for (py::handle item : it) {
    if (PyBool_Check(item.ptr()) || !PyIndex_Check(item.ptr()))
      fail(name + "[" + std::to_string(i) + "] must be an int, got " +
           std::string(py::str(py::type::of(item))));
    py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
    if (!idx) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      fail(name + "[" + std::to_string(i) + "] does not fit int32");
    }
    push(v, i);
    ++i;
  }
  return out;
}

// The binding's suffix speculator. The mutex serialises calls when Python
// threads share one; it is taken after the GIL is released, so a thread
// waiting for it while holding the GIL never blocks the holder.
struct Suffix {
  atlas::SuffixSpeculator spec;
  std::mutex mu;
};

int64_t rid_arg(py::handle rid) {
  return checked_int(rid, "rid", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
}

template <typename F>
void suffix_call_nogil(Suffix& s, F f) {
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(s.mu);
    st = f(s.spec);
  }
  throw_if_error(st);
}

}  // namespace

#ifdef ATLAS_WITH_CUDA
// ---- CUDA kernels (tensors on a CUDA device; the launchers are in cuda/) --------------------
#include <cstddef>

#include "atlas/cuda_ops.h"

namespace {

// Every tensor of one call must live on the device of the first.
void on_device(View& v, int device) {
  if (!v.on_cuda) fail(v.name + " must be a CUDA tensor, got one in CPU memory");
  if (v.device_id != device)
    fail(v.name + " must be on cuda:" + std::to_string(device) + ", got cuda:" + std::to_string(v.device_id));
}

void* stream_of(py::handle stream) {
  return reinterpret_cast<void*>(
      static_cast<uintptr_t>(checked_int(stream, "stream", 0, std::numeric_limits<int64_t>::max())));
}

// Makes `device` current for the call and restores the caller's device after.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    throw_if_error(atlas::cuda_get_device(&previous));
    if (previous != device) throw_if_error(atlas::cuda_set_device(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (previous >= 0 && atlas::cuda_get_device(&now).ok() && now != previous)
      (void)atlas::cuda_set_device(previous);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

// Runs a launcher without the GIL, then (check) reads the status array back.
template <typename F>
void launch_and_check(F&& launch, const int32_t* status, int64_t n, const char* op, void* stream,
                      bool check) {
  atlas::Status st;
  {
    py::gil_scoped_release nogil;
    st = launch();
    if (st.ok() && check && status != nullptr) st = atlas::device_status_check(status, n, op, stream);
  }
  throw_if_error(st);
}

static_assert(sizeof(atlas::SamplingParams) == 32, "the Python packing of SamplingParams assumes 32 bytes");
static_assert(sizeof(atlas::SlotCopy) == 16, "copies cross as int64 [n, 2]");

// Byte offsets of the SamplingParams fields, so that Python packs them without guessing.
py::dict sampling_params_layout() {
  py::dict d;
  d["itemsize"] = sizeof(atlas::SamplingParams);
  d["temperature"] = offsetof(atlas::SamplingParams, temperature);
  d["top_k"] = offsetof(atlas::SamplingParams, top_k);
  d["top_p"] = offsetof(atlas::SamplingParams, top_p);
  d["seed"] = offsetof(atlas::SamplingParams, seed);
  d["offset"] = offsetof(atlas::SamplingParams, offset);
  return d;
}

void verify_cuda(py::handle logits_obj, py::handle tokens_obj, py::handle parents_obj, py::handle offsets_obj,
                 py::handle params_obj, py::handle draft_obj, py::handle accepted_obj, py::handle emitted_obj,
                 py::handle num_obj, py::handle status_obj, py::handle workspace_obj, py::handle stream,
                 bool greedy_prepass, bool check) {
  View logits = view_of(logits_obj, "logits");
  logits.dtype({Elem::kF32, Elem::kBF16}).dims(2).inner_dense();
  if (!logits.on_cuda) fail("logits must be a CUDA tensor, got one in CPU memory");
  const int dev = logits.device_id;
  const int64_t total = logits.shape[0];
  const int64_t vocab = logits.shape[1];
  if (vocab < 1) fail("logits must have at least one column (vocab >= 1), got shape " + logits.shape_str());
  if (logits.strides[0] < vocab) fail("logits rows must not overlap (row stride >= vocab)");
  View tokens = view_of(tokens_obj, "tokens");
  tokens.dtype({Elem::kI32}).dims(1).dense().dim(0, total, "logits.shape[0] (number of tree nodes)");
  on_device(tokens, dev);
  View parents = view_of(parents_obj, "parents");
  parents.dtype({Elem::kI32}).dims(1).dense().dim(0, total, "logits.shape[0] (number of tree nodes)");
  on_device(parents, dev);
  View offsets = view_of(offsets_obj, "tree_offsets");
  offsets.dtype({Elem::kI64}).dims(1).dense();
  on_device(offsets, dev);
  if (offsets.shape[0] < 2)
    fail("tree_offsets must hold batch + 1 >= 2 entries, got shape " + offsets.shape_str());
  const int64_t batch = offsets.shape[0] - 1;
  if (total < batch)
    fail("logits.shape[0] must be >= batch (one root per tree), got " + std::to_string(total));
  View params = view_of(params_obj, "params");
  params.dtype({Elem::kU8}).dims(2).dense().dim(0, batch, "batch").dim(1, sizeof(atlas::SamplingParams),
                                                                       "sizeof(SamplingParams)");
  on_device(params, dev);
  View draft = optional_view(draft_obj, "draft_probs");
  if (draft.data) {
    draft.dtype({Elem::kF32}).dims(2).inner_dense().dim(0, total, "logits.shape[0]").dim(1, vocab, "vocab");
    on_device(draft, dev);
    if (draft.strides[0] < vocab) fail("draft_probs rows must not overlap (row stride >= vocab)");
  }
  View accepted = view_of(accepted_obj, "accepted_out");
  accepted.dtype({Elem::kI32}).dims(2).dense().output().dim(0, batch, "batch");
  on_device(accepted, dev);
  const int64_t max_accept = accepted.shape[1];
  View emitted = view_of(emitted_obj, "emitted_out");
  emitted.dtype({Elem::kI32}).dims(2).dense().output().dim(0, batch, "batch").dim(1, max_accept + 1,
                                                                                   "max_accept + 1");
  on_device(emitted, dev);
  View num = view_of(num_obj, "num_accepted_out");
  num.dtype({Elem::kI32}).dims(1).dense().output().dim(0, batch, "batch");
  on_device(num, dev);
  View status = view_of(status_obj, "status_out");
  status.dtype({Elem::kI32}).dims(1).dense().output().dim(0, batch, "batch");
  on_device(status, dev);
  View ws = view_of(workspace_obj, "workspace");
  ws.dtype({Elem::kU8}).dims(1).dense().output();
  on_device(ws, dev);

  atlas::VerifyProblem p;
  p.logits = logits.data;
  p.logits_dtype = logits.elem == Elem::kF32 ? atlas::DType::kFloat32 : atlas::DType::kBFloat16;
  p.vocab = vocab;
  p.logits_row_stride = logits.strides[0];
  p.draft_probs = draft.ptr<const float>();
  p.draft_row_stride = draft.data ? draft.strides[0] : 0;
  p.tokens = tokens.ptr<const int32_t>();
  p.parents = parents.ptr<const int32_t>();
  p.tree_offsets = offsets.ptr<const int64_t>();
  p.batch = batch;
  p.params = params.ptr<const atlas::SamplingParams>();
  p.max_accept = max_accept;
  p.accepted_out = accepted.ptr<int32_t>();
  p.emitted_out = emitted.ptr<int32_t>();
  p.num_accepted_out = num.ptr<int32_t>();
  p.workspace = ws.data;
  p.workspace_bytes = ws.numel();
  atlas::VerifyCudaOptions o;
  o.total_nodes = total;
  o.status_out = status.ptr<int32_t>();
  o.greedy_prepass = greedy_prepass;
  void* s = stream_of(stream);
  DeviceGuard guard(dev);
  launch_and_check([&] { return atlas::verify_cuda(p, o, s); }, o.status_out, batch, "verify_cuda", s, check);
}

void philox_uniform_cuda(uint64_t seed, uint64_t position, py::handle streams_obj, py::handle js_obj,
                         py::handle out_obj, py::handle stream) {
  View streams = view_of(streams_obj, "streams");
  streams.dtype({Elem::kI32}).dims(1).dense();
  if (!streams.on_cuda) fail("streams must be a CUDA tensor, got one in CPU memory");
  const int dev = streams.device_id;
  View js = view_of(js_obj, "js");
  js.dtype({Elem::kI32}).dims(1).dense().dim(0, streams.shape[0], "len(streams)");
  on_device(js, dev);
  View out = view_of(out_obj, "out");
  out.dtype({Elem::kF64}).dims(1).dense().output().dim(0, streams.shape[0], "len(streams)");
  on_device(out, dev);
  void* s = stream_of(stream);
  DeviceGuard guard(dev);
  // int32 bit patterns are read as the uint32 counter words.
  launch_and_check([&] {
    return atlas::philox_uniform_cuda(seed, position, streams.ptr<const uint32_t>(), js.ptr<const uint32_t>(),
                                      streams.shape[0], out.ptr<double>(), s);
  }, nullptr, 0, "philox_uniform_cuda", s, false);
}

void kv_copy_slots_cuda(KVCache& kv, py::handle copies_obj, py::handle status_obj, py::handle stream,
                        bool check) {
  if (!kv.storage.on_cuda) fail("kv_copy_slots_cuda needs a cache whose storage is a CUDA tensor");
  const int dev = kv.storage.device_id;
  View copies = view_of(copies_obj, "copies");
  copies.dtype({Elem::kI64}).dims(2).dense().dim(1, 2, "2 (src_slot, dst_slot)");
  on_device(copies, dev);
  View status = optional_view(status_obj, "status_out");
  if (status.data) {
    status.dtype({Elem::kI32}).dims(1).dense().output().dim(0, 1, "1");
    on_device(status, dev);
  } else if (check) {
    fail("status_out is needed to check the copies (pass check=False to skip the check)");
  }
  void* s = stream_of(stream);
  DeviceGuard guard(dev);
  std::lock_guard<std::mutex> lock(kv.mu);
  launch_and_check([&] {
    return atlas::kv_copy_slots_cuda(kv.cache.config(), kv.storage.data, copies.ptr<const atlas::SlotCopy>(),
                                     copies.shape[0], s, status.ptr<int32_t>());
  }, status.ptr<int32_t>(), 1, "kv_copy_slots_cuda", s, check);
}

// The problem of a tree_attention_cuda call from its sizes alone (for the workspace size).
atlas::TreeAttentionCudaProblem attention_sizes(const KVCache& kv, py::handle layer, int64_t num_q_heads,
                                                int64_t total_q, int64_t batch, int64_t table_stride,
                                                double scale, py::handle max_context, py::handle max_q) {
  atlas::TreeAttentionCudaProblem p;
  p.cache = kv.cache.config();
  p.layer = static_cast<int32_t>(checked_int(layer, "layer", 0, p.cache.num_layers - 1));
  p.num_q_heads = static_cast<int32_t>(num_q_heads);
  p.total_q = total_q;
  p.batch = batch;
  p.block_table_stride = table_stride;
  if (!(scale > 0.0) || !std::isfinite(scale)) fail("scale must be a positive finite number");
  p.scale = static_cast<float>(scale);
  p.max_context = checked_int(max_context, "max_context", 0, int64_t{1} << 40);
  p.max_q_per_seq = checked_int(max_q, "max_q_per_seq", 0, int64_t{1} << 30);
  return p;
}

int64_t tree_attention_cuda_workspace_bytes(const KVCache& kv, py::handle num_q_heads, py::handle batch,
                                            py::handle max_context, py::handle max_q) {
  const int64_t heads = checked_int(num_q_heads, "num_q_heads", 1, 1 << 20);
  const int64_t b = checked_int(batch, "batch", 1, std::numeric_limits<int32_t>::max());
  atlas::TreeAttentionCudaProblem p =
      attention_sizes(kv, py::int_(0), heads, 0, b, 1, 1.0, max_context, max_q);
  if (!kv.storage.on_cuda) fail("tree_attention_cuda needs a cache whose storage is a CUDA tensor");
  DeviceGuard guard(kv.storage.device_id);
  int64_t bytes = 0;
  throw_if_error(atlas::tree_attention_cuda_workspace_bytes(p, &bytes));
  return bytes;
}

void tree_attention_cuda(const KVCache& kv, py::handle layer, py::handle q_obj, py::handle out_obj,
                         py::handle tables_obj, py::handle lens_obj, py::handle qoff_obj,
                         py::handle parents_obj, double scale, py::handle max_context, py::handle max_q,
                         py::handle status_obj, py::handle workspace_obj, py::handle stream, bool check) {
  if (!kv.storage.on_cuda) fail("tree_attention_cuda needs a cache whose storage is a CUDA tensor");
  const auto& c = kv.cache.config();
  const int dev = kv.storage.device_id;
  const Elem want = c.dtype == atlas::DType::kFloat32 ? Elem::kF32 : Elem::kBF16;
  View q = view_of(q_obj, "q");
  q.dtype({want}).dims(3).inner_dense().dim(2, c.head_dim, "head_dim");
  on_device(q, dev);
  View out = view_of(out_obj, "out");
  out.dtype({want}).dims(3).dense().output().dim(0, q.shape[0], "q.shape[0]").dim(1, q.shape[1], "q.shape[1]")
      .dim(2, c.head_dim, "head_dim");
  on_device(out, dev);
  View tables = view_of(tables_obj, "block_tables");
  tables.dtype({Elem::kI32}).dims(2).dense();
  on_device(tables, dev);
  const int64_t batch = tables.shape[0];
  if (batch < 1)
    fail("block_tables must have one row per sequence (batch >= 1), got shape " + tables.shape_str());
  if (tables.shape[1] < 1)
    fail("block_tables must have at least one column, got shape " + tables.shape_str());
  View lens = view_of(lens_obj, "context_lens");
  lens.dtype({Elem::kI32}).dims(1).dense().dim(0, batch, "batch (block_tables.shape[0])");
  on_device(lens, dev);
  View qoff = view_of(qoff_obj, "q_offsets");
  qoff.dtype({Elem::kI64}).dims(1).dense().dim(0, batch + 1, "batch + 1");
  on_device(qoff, dev);
  View parents = view_of(parents_obj, "parents");
  parents.dtype({Elem::kI32}).dims(1).dense().dim(0, q.shape[0], "q.shape[0]");
  on_device(parents, dev);
  View status = view_of(status_obj, "status_out");
  status.dtype({Elem::kI32}).dims(1).dense().output().dim(0, batch, "batch");
  on_device(status, dev);
  View ws = view_of(workspace_obj, "workspace");
  ws.dtype({Elem::kU8}).dims(1).dense().output();
  if (ws.numel() > 0) on_device(ws, dev);
  if (q.shape[1] < 1 || q.shape[1] % c.num_kv_heads != 0)
    fail("q.shape[1] (query heads) must be a positive multiple of num_kv_heads = " +
         std::to_string(c.num_kv_heads));

  atlas::TreeAttentionCudaProblem p = attention_sizes(kv, layer, q.shape[1], q.shape[0], batch,
                                                      tables.shape[1], scale, max_context, max_q);
  p.storage = kv.storage.data;
  p.q = q.data;
  p.q_stride_token = q.strides[0];
  p.q_stride_head = q.strides[1];
  p.out = out.data;
  p.block_tables = tables.ptr<const int32_t>();
  p.context_lens = lens.ptr<const int32_t>();
  p.q_offsets = qoff.ptr<const int64_t>();
  p.parents = parents.ptr<const int32_t>();
  p.status_out = status.ptr<int32_t>();
  p.workspace = ws.numel() > 0 ? ws.data : nullptr;
  p.workspace_bytes = ws.numel();
  void* s = stream_of(stream);
  DeviceGuard guard(dev);
  launch_and_check([&] { return atlas::tree_attention_cuda(p, s); }, p.status_out, batch,
                   "tree_attention_cuda", s, check);
}

}  // namespace
#endif  // ATLAS_WITH_CUDA

PYBIND11_MODULE(_native, m) {
  m.doc() = "atlas native core: draft tree, lossless verifier, paged KV cache, tree attention";
  py::register_exception<CacheFullError>(m, "CacheFullError", PyExc_RuntimeError);

  m.def("build_info", &build_info, "What this extension was built with.");
  m.def("set_helper_cpus", &set_helper_cpus, py::arg("cpus"),
        "Restricts atlas's helper threads (the native pool's workers, the draft heads' cache warm-up "
        "threads) to these CPUs, each from when it next wakes; an empty iterable lifts the restriction "
        "(each goes back to the CPUs it started with). ValueError for a number outside [0, 1023] or "
        "given twice; RuntimeError off Linux. See atlas/pool.h.");
  m.def("helper_cpus", &atlas::helper_cpus, "The CPUs last given to set_helper_cpus (sorted; [] = none).");
  m.def("cpu_features", &cpu_features,
        "The CPU features atlas checks at run time (all False off x86-64): avx2_fma and avx512f (the "
        "kernels' wide paths), avx512_bf16 and amx_bf16 (bfloat16 dot products).");

  // -- draft tree
  py::class_<atlas::DraftTree>(m, "DraftTree")
      .def(py::init([](py::handle root_token, py::handle max_nodes, py::handle vocab_size) {
             return make_tree(checked_int(root_token, "root_token", std::numeric_limits<int32_t>::min(),
                                          std::numeric_limits<int32_t>::max()),
                              checked_int(max_nodes, "max_nodes", 1, atlas::kMaxTreeNodes),
                              checked_int(vocab_size, "vocab_size", 0, std::numeric_limits<int32_t>::max()));
           }),
           py::arg("root_token"), py::arg("max_nodes") = 64, py::arg("vocab_size") = 0)
      .def("add_child",
           [](atlas::DraftTree& t, py::handle parent, py::handle token, double confidence, py::handle proposer) {
             int32_t node = -1;
             throw_if_error(t.add_child(
                 static_cast<int32_t>(checked_int(parent, "parent", 0, std::numeric_limits<int32_t>::max())),
                 static_cast<int32_t>(checked_int(token, "token", std::numeric_limits<int32_t>::min(),
                                                  std::numeric_limits<int32_t>::max())),
                 static_cast<float>(confidence),
                 static_cast<int32_t>(checked_int(proposer, "proposer", 0, atlas::kMaxProposers - 1)), &node));
             return node;
           },
           py::arg("parent"), py::arg("token"), py::arg("confidence") = 1.0, py::arg("proposer") = 0,
           "Add (or merge into) a child of `parent`; returns its index, or -1 when the tree is full.")
      .def("add_path",
           [](atlas::DraftTree& t, py::handle tokens_obj, py::handle conf_obj, py::handle proposer,
              py::handle parent) {
             View tokens = view_of(tokens_obj, "tokens");
             tokens.dtype({Elem::kI32}).dims(1).cpu().dense();
             View conf = optional_view(conf_obj, "confidences");
             if (conf.data) conf.dtype({Elem::kF32}).dims(1).cpu().dense().dim(0, tokens.shape[0], "len(tokens)");
             if (tokens.shape[0] > atlas::kMaxTreeNodes)
               fail("tokens is longer than the largest tree (" + std::to_string(atlas::kMaxTreeNodes) + ")");
             int32_t placed = 0, last = 0;
             throw_if_error(t.add_path(
                 static_cast<int32_t>(checked_int(parent, "parent", 0, std::numeric_limits<int32_t>::max())),
                 tokens.ptr<const int32_t>(), conf.ptr<const float>(), static_cast<int32_t>(tokens.shape[0]),
                 static_cast<int32_t>(checked_int(proposer, "proposer", 0, atlas::kMaxProposers - 1)), &placed,
                 &last));
             return py::make_tuple(placed, last);
           },
           py::arg("tokens"), py::arg("confidences") = py::none(), py::arg("proposer") = 0, py::arg("parent") = 0,
           "Add a chain below `parent`, merging shared prefixes; returns (placed, last_node).")
      .def("assign",
           [](atlas::DraftTree& t, py::handle tokens_obj, py::handle parents_obj, py::handle conf_obj,
              py::handle prop_obj, py::handle max_nodes, py::handle vocab_size) {
             View tokens = view_of(tokens_obj, "tokens");
             tokens.dtype({Elem::kI32}).dims(1).cpu().dense();
             const int64_t n = tokens.shape[0];
             View parents = view_of(parents_obj, "parents");
             parents.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, n, "len(tokens)");
             View conf = optional_view(conf_obj, "confidences");
             if (conf.data) conf.dtype({Elem::kF32}).dims(1).cpu().dense().dim(0, n, "len(tokens)");
             View prop = optional_view(prop_obj, "proposers");
             if (prop.data) prop.dtype({Elem::kI32}).dims(1).cpu().dense().dim(0, n, "len(tokens)");
             if (n < 1) fail("tokens must hold at least the root, got an empty tree");
             const int64_t cap = checked_int(max_nodes, "max_nodes", 1, atlas::kMaxTreeNodes);
             if (n > cap) fail("the tree has " + std::to_string(n) + " nodes, more than max_nodes = " + std::to_string(cap));
             throw_if_error(t.assign(tokens.ptr<const int32_t>(), parents.ptr<const int32_t>(), conf.ptr<const float>(),
                                     prop.ptr<const uint32_t>(), static_cast<int32_t>(n), static_cast<int32_t>(cap),
                                     static_cast<int32_t>(checked_int(vocab_size, "vocab_size", 0,
                                                                      std::numeric_limits<int32_t>::max()))));
           },
           py::arg("tokens"), py::arg("parents"), py::arg("confidences") = py::none(),
           py::arg("proposers") = py::none(), py::arg("max_nodes") = atlas::kMaxTreeNodes, py::arg("vocab_size") = 0,
           "Replace the tree by explicit arrays (parents[0] = -1, parents[i] < i); proposers are bit masks.")
      .def("flatten_into",
           [](const atlas::DraftTree& t, py::handle committed_len, py::handle tok_obj, py::handle pos_obj,
              py::handle par_obj, py::handle mask_obj) {
             const int64_t n = t.size();
             const int64_t cl = checked_int(committed_len, "committed_len", 0, std::numeric_limits<int64_t>::max() / 2);
             View tok = optional_view(tok_obj, "tokens_out");
             if (tok.data) tok.dtype({Elem::kI32}).dims(1).cpu().dense().output().dim(0, n, "tree size");
             View pos = optional_view(pos_obj, "positions_out");
             if (pos.data) pos.dtype({Elem::kI64}).dims(1).cpu().dense().output().dim(0, n, "tree size");
             View par = optional_view(par_obj, "parents_out");
             if (par.data) par.dtype({Elem::kI32}).dims(1).cpu().dense().output().dim(0, n, "tree size");
             View mask = optional_view(mask_obj, "ancestor_mask_out");
             if (mask.data)
               mask.dtype({Elem::kU8, Elem::kBool}).dims(2).cpu().dense().output().dim(0, n, "tree size").dim(1, n, "tree size");
             throw_if_error(t.flatten(cl, tok.ptr<int32_t>(), pos.ptr<int64_t>(), par.ptr<int32_t>(), mask.ptr<uint8_t>()));
           },
           py::arg("committed_len"), py::arg("tokens_out") = py::none(), py::arg("positions_out") = py::none(),
           py::arg("parents_out") = py::none(), py::arg("ancestor_mask_out") = py::none(),
           "Write the flattened tree into caller-owned arrays (any may be None).")
      .def_property_readonly("size", &atlas::DraftTree::size)
      .def("__len__", &atlas::DraftTree::size)
      .def_property_readonly("max_nodes", &atlas::DraftTree::max_nodes)
      .def_property_readonly("vocab_size", &atlas::DraftTree::vocab_size)
      .def_property_readonly("max_depth", &atlas::DraftTree::max_depth)
      .def_property_readonly("tokens", [](const atlas::DraftTree& t) {
        return node_field<int32_t>(t, [](const atlas::DraftNode& n) { return n.token; });
      })
      .def_property_readonly("parents", [](const atlas::DraftTree& t) {
        return node_field<int32_t>(t, [](const atlas::DraftNode& n) { return n.parent; });
      })
      .def_property_readonly("depths", [](const atlas::DraftTree& t) {
        return node_field<int32_t>(t, [](const atlas::DraftNode& n) { return n.depth; });
      })
      .def_property_readonly("confidences", [](const atlas::DraftTree& t) {
        return node_field<float>(t, [](const atlas::DraftNode& n) { return n.confidence; });
      })
      .def_property_readonly("proposers", [](const atlas::DraftTree& t) {
        return node_field<uint32_t>(t, [](const atlas::DraftNode& n) { return n.proposers; });
      })
      .def_property_readonly("multiplicity", [](const atlas::DraftTree& t) {
        return node_field<int32_t>(t, [](const atlas::DraftNode& n) { return n.multiplicity; });
      });

  m.attr("MAX_TREE_NODES") = atlas::kMaxTreeNodes;
  m.attr("MAX_PROPOSERS") = atlas::kMaxProposers;

  // -- verifier
  m.def("verify_workspace_bytes", [](py::handle vocab) {
    return atlas::verify_workspace_bytes(checked_int(vocab, "vocab", 1, std::numeric_limits<int32_t>::max()));
  }, py::arg("vocab"));
  m.def("verify", &verify, py::arg("logits"), py::arg("tokens"), py::arg("parents"), py::arg("tree_offsets"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("offset"),
        py::arg("draft_probs"), py::arg("accepted_out"), py::arg("emitted_out"), py::arg("num_accepted_out"),
        py::arg("workspace"),
        "Verify a batch of flattened draft trees against target logits; writes the *_out arrays.");
  m.def("top_k_probs", [](py::handle logits, py::handle k, py::handle ids, py::handle probs,
                          py::handle ws) { top_k(logits, k, ids, probs, ws, false); },
        py::arg("logits"), py::arg("k"), py::arg("ids_out"), py::arg("probs_out"), py::arg("workspace"),
        "Per logits row: the k most probable tokens (descending) and their softmax probabilities over the "
        "whole row, into ids_out [rows, k] int32 and probs_out [rows, k] float32 (verify.h: top_k_probs).");
  m.def("top_k_logits", [](py::handle logits, py::handle k, py::handle ids, py::handle values,
                           py::handle ws) { top_k(logits, k, ids, values, ws, true); },
        py::arg("logits"), py::arg("k"), py::arg("ids_out"), py::arg("logits_out"), py::arg("workspace"),
        "Per logits row: the k largest logits (descending; equal logits in ascending id) and their token ids, "
        "into ids_out [rows, k] int32 and logits_out [rows, k] float32 (verify.h: top_k_probs).");
  m.def("philox_uniform", [](uint64_t seed, uint64_t position, uint32_t stream, uint32_t j) {
    return atlas::philox_uniform(seed, position, stream, j);
  }, py::arg("seed"), py::arg("position"), py::arg("stream"), py::arg("j"),
        "The verifier's uniform (53 bits in [0, 1)) for a position, stream and index (verify.h).");

  // -- KV cache
  py::class_<KVCache>(m, "PagedKVCache")
      .def(py::init([](py::handle num_layers, py::handle num_kv_heads, py::handle head_dim, py::handle num_blocks,
                       py::handle block_size, py::handle max_seqs, py::handle storage) {
             const int64_t big = std::numeric_limits<int32_t>::max();
             return make_kv_cache(checked_int(num_layers, "num_layers", 1, 4096),
                                  checked_int(num_kv_heads, "num_kv_heads", 1, 4096),
                                  checked_int(head_dim, "head_dim", 1, 4096),
                                  checked_int(num_blocks, "num_blocks", 1, big),
                                  checked_int(block_size, "block_size", 1, 4096),
                                  checked_int(max_seqs, "max_seqs", 1, 1 << 20), storage);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_blocks"),
           py::arg("block_size"), py::arg("max_seqs"), py::arg("storage"))
      .def("create", [](KVCache& kv) {
        std::lock_guard<std::mutex> lock(kv.mu);
        int32_t seq = -1;
        throw_if_error(kv.cache.create(&seq));
        return seq;
      })
      .def("fork", [](KVCache& kv, py::handle seq) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        int32_t child = -1;
        throw_if_error(kv.cache.fork(seq.cast<int32_t>(), &child));
        return child;
      }, py::arg("seq"))
      .def("release", [](KVCache& kv, py::handle seq) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        throw_if_error(kv.cache.release(seq.cast<int32_t>()));
      }, py::arg("seq"))
      .def("reserve", [](KVCache& kv, py::handle seq, py::handle n_obj, py::handle out_obj) {
        check_seq_arg(seq);
        const int64_t n = checked_int(n_obj, "n", 1, std::numeric_limits<int32_t>::max());
        const auto& cfg = kv.cache.config();
        const int64_t capacity = static_cast<int64_t>(cfg.num_blocks) * cfg.block_size;
        // Refused before the slots array is allocated: n could be 2^31 - 1.
        if (n > capacity)
          throw CacheFullError("n = " + std::to_string(n) + " exceeds the whole cache (" +
                               std::to_string(capacity) + " slots)");
        py::object result = py::reinterpret_borrow<py::object>(out_obj);
        if (out_obj.is_none()) result = py::array_t<int64_t>(n);
        View out = view_of(result, "slots_out");
        out.dtype({Elem::kI64}).dims(1).cpu().dense().output().dim(0, n, "n");
        std::lock_guard<std::mutex> lock(kv.mu);
        throw_if_error(kv.cache.reserve(seq.cast<int32_t>(), static_cast<int32_t>(n), out.ptr<int64_t>()));
        return result;
      }, py::arg("seq"), py::arg("n"), py::arg("slots_out") = py::none(),
      "Reserve n slots after the committed tokens; returns their slot ids (int64).")
      .def("commit", [](KVCache& kv, py::handle seq, py::handle keep_obj) {
        check_seq_arg(seq);
        View keep = optional_view(keep_obj, "keep");
        if (!keep_obj.is_none()) keep.dtype({Elem::kI32}).dims(1).cpu().dense();
        if (keep.shape.size() == 1 && keep.shape[0] > std::numeric_limits<int32_t>::max())
          fail("keep is longer than any reservation");
        // None keeps everything; an empty array keeps nothing (and may have no data pointer).
        static const int32_t kNone = 0;
        const int32_t* keep_ptr =
            keep_obj.is_none() ? nullptr : (keep.data ? keep.ptr<const int32_t>() : &kNone);
        const int32_t n_keep = keep_obj.is_none() ? 0 : static_cast<int32_t>(keep.shape[0]);
        std::lock_guard<std::mutex> lock(kv.mu);
        throw_if_error(kv.cache.commit(seq.cast<int32_t>(), keep_ptr, n_keep));
      }, py::arg("seq"), py::arg("keep") = py::none(),
      "Commit the reserved slots listed in keep (all when None) as the next positions.")
      .def("truncate", [](KVCache& kv, py::handle seq, py::handle new_length) {
        check_seq_arg(seq);
        const int64_t n = checked_int(new_length, "new_length", 0, std::numeric_limits<int64_t>::max());
        std::lock_guard<std::mutex> lock(kv.mu);
        throw_if_error(kv.cache.truncate(seq.cast<int32_t>(), n));
      }, py::arg("seq"), py::arg("new_length"),
      "Forget committed positions new_length.. of the sequence (no reservation may be pending).")
      .def("length", [](const KVCache& kv, py::handle seq) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        int64_t len = 0;
        throw_if_error(kv.cache.length(seq.cast<int32_t>(), &len));
        return len;
      }, py::arg("seq"))
      .def("reserved", [](const KVCache& kv, py::handle seq) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        int32_t n = 0;
        throw_if_error(kv.cache.reserved(seq.cast<int32_t>(), &n));
        return n;
      }, py::arg("seq"))
      .def("slot_of", [](const KVCache& kv, py::handle seq, py::handle pos) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        int64_t slot = 0;
        throw_if_error(kv.cache.slot_of(seq.cast<int32_t>(),
                                        checked_int(pos, "pos", 0, std::numeric_limits<int64_t>::max()), &slot));
        return slot;
      }, py::arg("seq"), py::arg("pos"))
      .def("block_table", [](const KVCache& kv, py::handle seq) {
        check_seq_arg(seq);
        std::lock_guard<std::mutex> lock(kv.mu);
        const int32_t* table = nullptr;
        int32_t n = 0;
        throw_if_error(kv.cache.block_table(seq.cast<int32_t>(), &table, &n));
        py::array_t<int32_t> out(n);
        if (n) std::memcpy(out.mutable_data(), table, sizeof(int32_t) * static_cast<size_t>(n));
        return out;
      }, py::arg("seq"))
      .def("ref_count", [](const KVCache& kv, py::handle block) {
        std::lock_guard<std::mutex> lock(kv.mu);
        int32_t c = 0;
        throw_if_error(kv.cache.ref_count(
            static_cast<int32_t>(checked_int(block, "block", 0, std::numeric_limits<int32_t>::max())), &c));
        return c;
      }, py::arg("block"))
      .def_property_readonly("num_free_blocks", [](const KVCache& kv) {
        std::lock_guard<std::mutex> lock(kv.mu);
        return kv.cache.num_free_blocks();
      })
      .def_property_readonly("num_live_seqs", [](const KVCache& kv) {
        std::lock_guard<std::mutex> lock(kv.mu);
        return kv.cache.num_live_seqs();
      })
      .def_property_readonly("num_blocks", [](const KVCache& kv) { return kv.cache.config().num_blocks; })
      .def_property_readonly("block_size", [](const KVCache& kv) { return kv.cache.config().block_size; })
      .def_property_readonly("on_device", [](const KVCache& kv) { return kv.storage.on_cuda; })
      .def("pending_copies", [](const KVCache& kv) {
        std::lock_guard<std::mutex> lock(kv.mu);
        const auto& pc = kv.cache.pending_copies();
        py::array_t<int64_t> out({static_cast<py::ssize_t>(pc.size()), static_cast<py::ssize_t>(2)});
        auto* p = out.mutable_data();
        for (size_t i = 0; i < pc.size(); ++i) {
          p[2 * i] = pc[i].src_slot;
          p[2 * i + 1] = pc[i].dst_slot;
        }
        return out;
      }, "Row copies (src_slot, dst_slot) left for a device kernel when the storage is on a GPU.")
      .def("clear_pending_copies", [](KVCache& kv) {
        std::lock_guard<std::mutex> lock(kv.mu);
        kv.cache.clear_pending_copies();
      })
      .def("shuffle_free_blocks", [](KVCache& kv, uint64_t seed) {
        std::lock_guard<std::mutex> lock(kv.mu);
        kv.cache.shuffle_free_blocks(seed);
      }, py::arg("seed"));

  m.def("rope_store", &rope_store, py::arg("cache"), py::arg("layer"), py::arg("qkv"), py::arg("cos"),
        py::arg("sin"), py::arg("slots"), py::arg("q_out"),
        "Rotary embedding of a few rows' q and k heads (qkv float32 [rows, q heads + 2 kv heads, head_dim]; cos "
        "and sin float32 [rows, head_dim] at each row's position, rotate-half sign folded into sin) into q_out "
        "(float32 [rows, q heads, head_dim]) and the layer's keys at slots (int64 [rows]), the values as given "
        "(float32 CPU caches; see atlas/layer_ops.h).");
  m.def("tree_attention", &tree_attention, py::arg("cache"), py::arg("layer"), py::arg("q"), py::arg("out"),
        py::arg("seq_ids"), py::arg("q_offsets"), py::arg("parents"), py::arg("scale"), py::arg("threads") = 1,
        "Attention of tree nodes (queries) over their sequence's committed context and their ancestors; "
        "`threads` share each tile's kv heads (the result does not depend on it).");

#ifdef ATLAS_WITH_CUDA
  // -- CUDA kernels: tensors on one CUDA device, `stream` = torch.cuda.current_stream().cuda_stream
  m.def("cuda_device_count", &atlas::cuda_device_count, "CUDA devices visible (0 without a driver).");
  m.def("device_error_message", [](int32_t code) { return std::string(atlas::device_error_message(code)); },
        py::arg("code"), "The message of a status code written by a CUDA kernel.");
  m.def("sampling_params_layout", &sampling_params_layout,
        "Byte layout of the SamplingParams rows that verify_cuda reads.");
  m.def("verify_cuda_workspace_bytes", [](py::handle vocab, py::handle batch, py::handle total_nodes) {
    return atlas::verify_cuda_workspace_bytes(
        checked_int(vocab, "vocab", 1, std::numeric_limits<int32_t>::max()),
        checked_int(batch, "batch", 1, std::numeric_limits<int32_t>::max()),
        checked_int(total_nodes, "total_nodes", 1, std::numeric_limits<int32_t>::max()));
  }, py::arg("vocab"), py::arg("batch"), py::arg("total_nodes"));
  m.def("verify_cuda", &verify_cuda, py::arg("logits"), py::arg("tokens"), py::arg("parents"),
        py::arg("tree_offsets"), py::arg("params"), py::arg("draft_probs"), py::arg("accepted_out"),
        py::arg("emitted_out"), py::arg("num_accepted_out"), py::arg("status_out"),
        py::arg("workspace"), py::arg("stream"), py::arg("greedy_prepass") = false, py::arg("check") = true,
        "verify() on a CUDA device; writes the *_out tensors (check: wait and raise on a device error).");
  m.def("philox_uniform_cuda", &philox_uniform_cuda, py::arg("seed"), py::arg("position"), py::arg("streams"),
        py::arg("js"), py::arg("out"), py::arg("stream"),
        "The verifier's Philox uniforms computed on the device (tests).");
  m.def("kv_copy_slots_cuda", &kv_copy_slots_cuda, py::arg("cache"), py::arg("copies"), py::arg("status_out"),
        py::arg("stream"), py::arg("check") = true,
        "Apply (src_slot, dst_slot) row copies, in order, to a cache's CUDA storage.");
  m.def("tree_attention_cuda_workspace_bytes", &tree_attention_cuda_workspace_bytes, py::arg("cache"),
        py::arg("num_q_heads"), py::arg("batch"), py::arg("max_context"), py::arg("max_q_per_seq"));
  m.def("tree_attention_cuda", &tree_attention_cuda, py::arg("cache"), py::arg("layer"), py::arg("q"),
        py::arg("out"), py::arg("block_tables"), py::arg("context_lens"), py::arg("q_offsets"),
        py::arg("parents"), py::arg("scale"), py::arg("max_context"), py::arg("max_q_per_seq"),
        py::arg("status_out"), py::arg("workspace"), py::arg("stream"), py::arg("check") = true,
        "Tree attention over a cache's CUDA storage through device block tables.");
#endif

  // -- small-batch linear layers (the target's forward on the CPU)
  py::class_<atlas::PackedLinear>(m, "PackedLinear",
      "A float32 weight [N, K] copied into panels for y = x W^T (+ bias) on a few rows, on several threads "
      "(see atlas/linear.h).")
      .def(py::init(&make_packed_linear), py::arg("weight"), py::arg("simd") = "auto",
           "Copies weight (float32 [N, K], CPU, contiguous rows). simd='baseline' keeps to the SSE kernel, "
           "'avx2' to the AVX2 + FMA one where the CPU has AVX-512 (the same bits as AVX-512).")
      .def("forward", &packed_linear_forward, py::arg("x"), py::arg("out"), py::arg("bias") = py::none(),
           py::arg("threads") = 1,
           "out[r] = x[r] W^T (+ bias) for every row of x (float32 [rows, K]) into out (float32 [rows, N]).")
      .def_property_readonly("out_features", &atlas::PackedLinear::out_features)
      .def_property_readonly("in_features", &atlas::PackedLinear::in_features)
      .def_property_readonly("wide", &atlas::PackedLinear::wide,
                             "Whether a fused multiply-add kernel runs (AVX2 + FMA or AVX-512; else the SSE "
                             "baseline).");

  m.def("rms_norm", &rms_norm_rows, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        "out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for every row of x (float32 [rows, n], CPU; "
        "weight float32 [n]); out (float32 [rows, n]) may be x itself (see atlas/layer_ops.h).");

  // -- draft head (learned speculator)
  py::class_<PyHeadSnapshot>(
      m, "DraftHeadSnapshot", "One pinned weight version of a DraftHead: every forward through it uses it.")
      .def_property_readonly("version", [](const PyHeadSnapshot& s) { return s.weights->version(); },
                             "The version's number (a derived one's: its base's).")
      .def_property_readonly("derived", [](const PyHeadSnapshot& s) { return s.weights->derived(); },
                             "True for a request-local version made by derive().")
      .def("derive", &head_derive, py::arg("weights"),
           "A request-local version: this one with the float tensors of `weights` (a dict, any non-empty "
           "subset of w_in, b_in, norm1, w_gate, w_up, w_down, norm2, w_out; float32 arrays) replaced, each "
           "validated as push validates it; draft_ids cannot change. Never live, not numbered, not in the "
           "history (see atlas/head.h: DraftHead::derive). Raises ValueError on bad input.")
      .def_property_readonly("draft_ids", [](const PyHeadSnapshot& s) {
        const auto& ids = s.weights->draft_ids();
        py::array_t<int32_t> out(static_cast<py::ssize_t>(ids.size()));
        if (!ids.empty()) std::memcpy(out.mutable_data(), ids.data(), sizeof(int32_t) * ids.size());
        return out;
      }, "Full-vocabulary token id of each logits column (int32 [draft_vocab], a copy).")
      .def("forward", [](PyHeadSnapshot& s, py::handle features, py::handle tokens, py::handle f_hat_out,
                         py::handle logits_out) {
        return head_forward(*s.owner, s.weights, features, tokens, f_hat_out, logits_out);
      }, py::arg("features"), py::arg("tokens"), py::arg("f_hat_out"), py::arg("logits_out"),
      "Like DraftHead.forward, with this snapshot's version; returns the version.")
      .def("draft", &head_draft, py::arg("features"), py::arg("tokens"), py::arg("budgets"), py::arg("floors"),
           py::arg("topk"), py::arg("width"), py::arg("max_depth"),
           "Best-first drafting with this version (atlas/head.h: HeadDraftJob): per request j, the feature of "
           "its root's parent position (features float32 [J, H]), the root's token (int32 [J]), a node budget "
           "(int32 [J], >= 1) and a path probability floor below depth 1 (float64 [J], in [0, 1)). Returns "
           "(offsets int64 [J + 1], parents int32, tokens int32, probs float32): request j's kept candidates are "
           "rows offsets[j]:offsets[j + 1], in creation order, each with its parent's row among them (-1: the "
           "root), its token id and the head's conditional probability of it.")
      .def("tensor", &head_snapshot_tensor, py::arg("name"),
           "The pushed tensor `name` (w_in, b_in, ...) as this version's forward uses it: a float32 copy in "
           "torch layout [out, in]; a matrix's values are the pushed ones rounded to bfloat16 (how the native "
           "head stores them), widened back to float32.")
      .def("prefetch", [](const PyHeadSnapshot& s) {
        bool queued = false;
        throw_if_error(s.owner->head.prefetch(s.weights, &queued));
        return queued;
      }, "Like DraftHead.prefetch, for this version (e.g. a derived one) instead of the live one.")
      .def_property_readonly("nbytes", [](const PyHeadSnapshot& s) { return s.weights->bytes(); },
                             "Bytes of weights this version holds (matrices in bfloat16, padded to whole "
                             "panels; vectors in float32; draft ids).");
  py::class_<PyDraftHead, std::shared_ptr<PyDraftHead>>(m, "DraftHead",
      "Native forward of the learned speculator's draft head with versioned weights (see atlas/head.h).")
      .def(py::init(&make_draft_head), py::arg("embed"), py::arg("hidden"), py::arg("intermediate"),
           py::arg("draft_vocab"), py::arg("eps") = 1e-5, py::arg("simd") = "auto",
           "embed: float32 [vocab, hidden], contiguous, frozen (kept alive and read in place). simd: 'auto' "
           "(the fastest path the CPU has: AVX-512 bfloat16 dot products, else AVX2 + FMA, else SSE), "
           "'avx2' (AVX2 + FMA where the CPU has it, else SSE) or 'baseline' (SSE). Every path computes the "
           "same bits.")
      .def("push", &head_push, py::arg("weights"), py::arg("metric") = py::none(),
           "Copy, validate and atomically swap in a new weight version (dict of name -> array); returns its "
           "number. A refused push raises and leaves the live version serving.")
      .def("forward", [](PyDraftHead& h, py::handle features, py::handle tokens, py::handle f_hat_out,
                         py::handle logits_out) {
        return head_forward(h, h.head.snapshot(), features, tokens, f_hat_out, logits_out);
      }, py::arg("features"), py::arg("tokens"), py::arg("f_hat_out"), py::arg("logits_out"),
      "features float32 [n, hidden], tokens int32 [n] -> f_hat_out float32 [n, hidden], logits_out float32 "
      "[n, draft_vocab] (caller-owned, written). Uses the live version; returns its number.")
      .def("snapshot", [](const std::shared_ptr<PyDraftHead>& h) -> py::object {
        auto w = h->head.snapshot();
        if (!w) return py::none();
        return py::cast(PyHeadSnapshot{h, std::move(w)});
      }, "The live version, pinned (None before the first push).")
      .def("set_metric", [](PyDraftHead& h, py::handle version, double metric) {
        if (!std::isfinite(metric)) fail("metric must be finite, got " + std::to_string(metric));
        const int64_t v = checked_int(version, "version", 1, std::numeric_limits<int64_t>::max());
        throw_if_error(h.head.set_metric(v, metric));
      }, py::arg("version"), py::arg("metric"),
      "Record a metric (e.g. measured acceptance) for a pushed version.")
      .def("prefetch", [](const PyDraftHead& h) {
        bool queued = false;
        throw_if_error(h.head.prefetch(&queued));
        return queued;
      }, "Start reading the live version's weights into the CPU caches on the head's background thread and "
         "return at once (see atlas/head.h, 'Warming the caches'): True when queued, False before the first "
         "push (or when the thread was just handing over a request: skipped, never waited for). A newer "
         "request, or 1.5 ms after this one, abandon it.")
      .def_property_readonly("prefetches_done", [](const PyDraftHead& h) { return h.head.prefetches_done(); },
                             "Background cache warm-ups completed so far.")
      .def_property_readonly("prefetches_abandoned",
                             [](const PyDraftHead& h) { return h.head.prefetches_abandoned(); },
                             "Warm-ups given up so far (a newer request came, or 1.5 ms passed).")
      .def_property_readonly("version", [](const PyDraftHead& h) { return h.head.version(); },
                             "Live version number (0 before the first push).")
      .def_property_readonly("history", &head_history,
                             "[(version, metric or None)] of the most recent pushes, oldest first.")
      .def_property_readonly("hidden", [](const PyDraftHead& h) { return h.head.config().hidden; })
      .def_property_readonly("intermediate",
                             [](const PyDraftHead& h) { return h.head.config().intermediate; })
      .def_property_readonly("draft_vocab", [](const PyDraftHead& h) { return h.head.config().draft_vocab; })
      .def_property_readonly("vocab", [](const PyDraftHead& h) { return h.head.config().vocab; })
      .def_property_readonly("eps", [](const PyDraftHead& h) { return h.head.config().eps; })
      .def_property_readonly("simd_path", [](const PyDraftHead& h) { return h.head.simd_path(); },
                             "The GEMM code the forward runs: 'avx512-bf16', 'avx2+fma' or 'sse'.");
  py::list head_tensors;
  for (int32_t t = 0; t < atlas::kNumHeadTensors; ++t) head_tensors.append(atlas::head_tensor_name(t));
  head_tensors.append(atlas::kHeadDraftIdsName);
  m.attr("DRAFT_HEAD_TENSORS") = py::tuple(head_tensors);

  // -- suffix speculator
  py::class_<Suffix>(m, "SuffixSpeculator")
      .def(py::init([](py::handle max_match, py::handle max_depth, py::handle max_occurrences,
                       py::handle min_support, py::handle max_corpus_tokens, py::handle index_prompts,
                       py::handle vocab_size, double min_prob) {
             const int64_t i32 = std::numeric_limits<int32_t>::max();
             atlas::SuffixConfig c;
             c.max_match = static_cast<int32_t>(checked_int(max_match, "max_match", 1, 1024));
             c.max_depth =
                 static_cast<int32_t>(checked_int(max_depth, "max_depth", 1, atlas::kMaxTreeNodes - 1));
             c.max_occurrences =
                 static_cast<int32_t>(checked_int(max_occurrences, "max_occurrences", 1, 4096));
             c.min_support = static_cast<int32_t>(checked_int(min_support, "min_support", 1, i32));
             c.max_corpus_tokens = checked_int(max_corpus_tokens, "max_corpus_tokens", 0, i32);
             if (!py::isinstance<py::bool_>(index_prompts))
               throw py::type_error("index_prompts must be a bool, got " +
                                    std::string(py::str(py::type::of(index_prompts))));
             c.index_prompts = index_prompts.cast<bool>();
             c.vocab_size = static_cast<int32_t>(checked_int(vocab_size, "vocab_size", 0, i32));
             c.min_prob = min_prob;
             auto s = std::make_unique<Suffix>();
             throw_if_error(s->spec.init(c));
             return s;
           }),
           py::arg("max_match") = 32, py::arg("max_depth") = 16, py::arg("max_occurrences") = 64,
           py::arg("min_support") = 2, py::arg("max_corpus_tokens") = 1 << 17,
           py::arg("index_prompts") = false, py::arg("vocab_size") = 0, py::arg("min_prob") = 0.0)
      .def("start", [](Suffix& s, py::handle rid_obj, py::handle tokens_obj) {
        const int64_t rid = rid_arg(rid_obj);
        std::vector<int32_t> t = token_ids(tokens_obj, "prompt_tokens");
        suffix_call_nogil(s, [&](atlas::SuffixSpeculator& sp) {
          return sp.start(rid, t.data(), static_cast<int64_t>(t.size()));
        });
      }, py::arg("rid"), py::arg("prompt_tokens"), "A request begins with these (non-empty) prompt tokens.")
      .def("extend", [](Suffix& s, py::handle rid_obj, py::handle tokens_obj) {
        const int64_t rid = rid_arg(rid_obj);
        std::vector<int32_t> t = token_ids(tokens_obj, "tokens");
        suffix_call_nogil(s, [&](atlas::SuffixSpeculator& sp) {
          return sp.extend(rid, t.data(), static_cast<int64_t>(t.size()));
        });
      }, py::arg("rid"), py::arg("tokens"), "Append a live request's newly committed tokens.")
      .def("finish", [](Suffix& s, py::handle rid_obj) {
        const int64_t rid = rid_arg(rid_obj);
        suffix_call_nogil(s, [&](atlas::SuffixSpeculator& sp) { return sp.finish(rid); });
      }, py::arg("rid"), "End a request: its output becomes a corpus document.")
      .def("add_document", [](Suffix& s, py::handle tokens_obj) {
        std::vector<int32_t> t = token_ids(tokens_obj, "tokens");
        suffix_call_nogil(s, [&](atlas::SuffixSpeculator& sp) {
          return sp.add_document(t.data(), static_cast<int64_t>(t.size()));
        });
      }, py::arg("tokens"), "Add a document to the corpus directly (evicting the oldest as needed).")
      .def("propose", [](Suffix& s, py::handle rid_obj, py::handle tree_obj, py::handle proposer_obj,
                         py::handle context_len) {
        const int64_t rid = rid_arg(rid_obj);
        if (!py::isinstance<atlas::DraftTree>(tree_obj))
          throw py::type_error("tree must be an atlas DraftTree, got " +
                               std::string(py::str(py::type::of(tree_obj))));
        atlas::DraftTree& tree = tree_obj.cast<atlas::DraftTree&>();
        const int32_t proposer =
            static_cast<int32_t>(checked_int(proposer_obj, "proposer", 0, atlas::kMaxProposers - 1));
        const int64_t expected = context_len.is_none()
                                     ? -1
                                     : checked_int(context_len, "context_len", 0,
                                                   std::numeric_limits<int64_t>::max());
        // Microseconds of work on a tree that Python owns: the GIL stays held.
        std::lock_guard<std::mutex> lock(s.mu);
        int32_t added = 0;
        throw_if_error(s.spec.propose(rid, &tree, proposer, expected, &added));
        return added;
      }, py::arg("rid"), py::arg("tree"), py::arg("proposer") = 0, py::arg("context_len") = py::none(),
      "Add draft nodes to `tree` (its root: the request's last token); returns how many nodes are new. "
      "context_len, when given, must equal the request's length.")
      .def("is_live", [](Suffix& s, py::handle rid_obj) {
        const int64_t rid = rid_arg(rid_obj);
        std::lock_guard<std::mutex> lock(s.mu);
        return s.spec.is_live(rid);
      }, py::arg("rid"))
      .def("length", [](Suffix& s, py::handle rid_obj) {
        const int64_t rid = rid_arg(rid_obj);
        std::lock_guard<std::mutex> lock(s.mu);
        int64_t n = 0;
        throw_if_error(s.spec.request_length(rid, &n));
        return n;
      }, py::arg("rid"), "Tokens of a live request (prompt + extended).")
      .def("memory_bytes", [](Suffix& s) {
        std::lock_guard<std::mutex> lock(s.mu);
        return s.spec.memory_bytes();
      }, "Bytes the speculator has allocated (corpus, live requests, proposal scratch).")
      .def("corpus_tokens", [](Suffix& s) {
        std::lock_guard<std::mutex> lock(s.mu);
        return s.spec.corpus_tokens();
      }, "Document tokens in the corpus (separators excluded).")
      .def("stats", [](Suffix& s) {
        atlas::SuffixStats st;
        {
          std::lock_guard<std::mutex> lock(s.mu);
          st = s.spec.stats();
        }
        py::dict d;
        d["live_requests"] = st.live_requests;
        d["corpus_docs"] = st.corpus_docs;
        d["corpus_tokens"] = st.corpus_tokens;
        d["evicted_docs"] = st.evicted_docs;
        d["evicted_tokens"] = st.evicted_tokens;
        d["proposals"] = st.proposals;
        d["matched"] = st.matched;
        d["match_length_sum"] = st.match_length_sum;
        d["proposed_nodes"] = st.proposed_nodes;
        return d;
      }, "Counters: live_requests, corpus_docs, corpus_tokens, evicted_docs, evicted_tokens, proposals, "
         "matched, match_length_sum, proposed_nodes.");
}
