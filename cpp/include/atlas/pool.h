// atlas/pool.h: the persistent worker threads that split one native call's
// work (the linear layers' panels, tree attention's kv heads and context
// halves) over the cores.
//
// parallel_parts(parts, fn, arg) runs fn(arg, i, parts) for i = 0 .. parts-1:
// part 0 on the calling thread, the others on workers 1 .. parts-1, and
// returns when every part is done. One call at a time: concurrent callers take
// turns (a mutex), and a part must not call parallel_parts itself.
//
// A worker spins for about kPoolSpinMicros after each part, since within a
// forward the next layer calls back within tens of microseconds, then sleeps
// until woken, so that between forwards it leaves its core to others. Workers
// are started on first need and live as long as the process; after fork() the
// child starts workers of its own.
//
// Helper CPUs. set_helper_cpus() restricts atlas's helper threads (this pool's
// workers and the draft heads' cache warm-up threads, atlas/head.h) to a set
// of CPUs; each applies the latest set to itself when it next wakes, so the
// call does not wait for them. An empty set lifts the restriction: each helper
// goes back to the CPUs it started with. Why: on the CPU the serving thread
// does the work between target forwards (verification, drafting, the learning
// tap) on one core, and a helper woken onto that core (a warm-up handed out
// after a forward, a pool worker that went to sleep) preempts it. The engine
// pins its serving thread to one CPU for the duration of a serve and hands the
// others here (atlas.Engine(pin_threads=)). Linux only: elsewhere a non-empty
// set is refused (Internal) and helpers run where the scheduler puts them.
#pragma once

#include <cstdint>
#include <vector>

#include "atlas/common.h"

namespace atlas {

constexpr int32_t kPoolMaxThreads = 64;
constexpr int64_t kPoolSpinMicros = 200;

using PartFn = void (*)(const void* arg, int32_t part, int32_t parts);

// parts in [1, kPoolMaxThreads] (the caller checks); parts == 1 runs fn on
// the calling thread alone.
void parallel_parts(int32_t parts, PartFn fn, const void* arg);

// cpus: distinct CPU numbers in [0, kMaxHelperCpu]; empty: no restriction.
// Invalid for a number out of range or repeated; it does not check that the
// process may use them (a helper that cannot apply a set keeps its CPUs).
constexpr int32_t kMaxHelperCpu = 1023;
Status set_helper_cpus(const std::vector<int32_t>& cpus);
std::vector<int32_t> helper_cpus();  // the set last given (sorted), empty: none

// For a helper thread, each time it wakes: applies the latest set to the
// calling thread if it changed since this thread last looked (one atomic load
// when it did not).
void follow_helper_cpus();

}  // namespace atlas
