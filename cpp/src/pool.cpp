// The worker pool behind parallel_parts (see atlas/pool.h).
#include "atlas/pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace atlas {

// ---- helper CPUs (see atlas/pool.h) ---------------------------------------------------------

namespace {

std::mutex helper_mu;                      // guards helper_set
std::vector<int32_t> helper_set;           // sorted; empty: no restriction
std::atomic<uint64_t> helper_generation{0};  // bumped by every set_helper_cpus

}  // namespace

Status set_helper_cpus(const std::vector<int32_t>& cpus) {
  std::vector<int32_t> sorted(cpus);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i] < 0 || sorted[i] > kMaxHelperCpu)
      return Status::Invalid("helper CPU " + std::to_string(sorted[i]) + " is outside [0, " +
                             std::to_string(kMaxHelperCpu) + "]");
    if (i > 0 && sorted[i] == sorted[i - 1])
      return Status::Invalid("helper CPU " + std::to_string(sorted[i]) + " is given twice");
  }
#if !defined(__linux__)
  if (!sorted.empty()) return Status::Internal("helper CPUs can be set on Linux only");
#endif
  std::lock_guard<std::mutex> lock(helper_mu);
  helper_set = std::move(sorted);
  helper_generation.fetch_add(1, std::memory_order_release);
  return Status::Ok();
}

std::vector<int32_t> helper_cpus() {
  std::lock_guard<std::mutex> lock(helper_mu);
  return helper_set;
}

void follow_helper_cpus() {
#if defined(__linux__)
  struct Mine {
    uint64_t seen = 0;      // the generation this thread last applied
    bool saved = false;     // `original` holds the CPUs it started with
    cpu_set_t original;
  };
  thread_local Mine mine;
  const uint64_t now = helper_generation.load(std::memory_order_acquire);
  if (now == mine.seen) return;
  mine.seen = now;
  if (!mine.saved) {
    CPU_ZERO(&mine.original);
    mine.saved = pthread_getaffinity_np(pthread_self(), sizeof(cpu_set_t), &mine.original) == 0;
    if (!mine.saved) return;
  }
  cpu_set_t want;
  {
    std::lock_guard<std::mutex> lock(helper_mu);
    if (helper_set.empty()) {
      want = mine.original;
    } else {
      CPU_ZERO(&want);
      for (int32_t c : helper_set) CPU_SET(c, &want);
    }
  }
  // A set the process may not use fails (EINVAL): the thread keeps its CPUs.
  (void)pthread_setaffinity_np(pthread_self(), sizeof(cpu_set_t), &want);
#endif
}

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Task {
  PartFn fn;
  const void* arg;
  int32_t parts;
};

// One task at a time (run() holds task_mu_ for the whole call). Worker i (1, 2,
// ...) waits on a counter of its own, `go`: the caller writes the task, sets
// remaining_ to the number of workers it needs (parts - 1), and bumps the
// counters of workers 1 .. parts-1 only; each runs its part and counts
// remaining_ down, while the caller runs part 0 and spins until remaining_ is
// 0. So a worker reads the task only when it takes part, and the caller writes
// the next task only after every reader is done. A worker that saw no task for
// kPoolSpinMicros sleeps on cv_; the caller wakes the sleepers through mu_,
// so a wake-up cannot be lost between a worker's last look at its counter and
// its wait.
class Pool {
 public:
  static Pool& get() {
    // After fork() the child has none of the workers: it starts a pool of its
    // own (the parent's is left as it is in the child's memory).
    static const bool registered = pthread_atfork(nullptr, nullptr, forget) == 0;
    (void)registered;
    Pool*& p = instance();
    if (p == nullptr) p = new Pool();  // never deleted: workers live as long as the process
    return *p;
  }

  void run(const Task& task) {
    std::lock_guard<std::mutex> one_task(task_mu_);
    grow(task.parts - 1);
    task_ = task;
    remaining_.store(task.parts - 1, std::memory_order_seq_cst);
    for (int32_t i = 1; i < task.parts; ++i)
      slots_[static_cast<size_t>(i - 1)]->go.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    part(task_, 0);
    while (remaining_.load(std::memory_order_acquire) != 0) cpu_relax();
  }

 private:
  struct alignas(64) Slot {  // one cache line per worker's counter
    std::atomic<uint64_t> go{0};
  };

  static Pool*& instance() {
    static Pool* p = nullptr;
    return p;
  }
  static void forget() { instance() = nullptr; }

  static void part(const Task& t, int32_t i) { t.fn(t.arg, i, t.parts); }

  void grow(int32_t want) {
    while (static_cast<int32_t>(slots_.size()) < want) {
      slots_.push_back(std::make_unique<Slot>());
      Slot* slot = slots_.back().get();
      const int32_t index = static_cast<int32_t>(slots_.size());
      std::thread([this, index, slot] { loop(index, slot); }).detach();
    }
  }

  void loop(int32_t index, Slot* slot) {
    uint64_t seen = 0;  // the slot's counter starts at 0 and only its tasks bump it
    for (;;) {
      follow_helper_cpus();
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; slot->go.load(std::memory_order_acquire) == seen; ++spins) {
        cpu_relax();
        if ((spins & 255) == 255 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(kPoolSpinMicros)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return slot->go.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          follow_helper_cpus();
          start = std::chrono::steady_clock::now();
        }
      }
      ++seen;  // one task at a time: the caller bumps it again only after this one is done
      part(task_, index);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex task_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int32_t> remaining_{0};
  std::atomic<int32_t> sleepers_{0};
  Task task_{};
  std::vector<std::unique_ptr<Slot>> slots_;  // worker i's counter is slots_[i - 1]
};

}  // namespace

void parallel_parts(int32_t parts, PartFn fn, const void* arg) {
  if (parts <= 1) {
    fn(arg, 0, 1);
    return;
  }
  Pool::get().run(Task{fn, arg, parts});
}

}  // namespace atlas
