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
#pragma once

#include <cstdint>

namespace atlas {

constexpr int32_t kPoolMaxThreads = 64;
constexpr int64_t kPoolSpinMicros = 200;

using PartFn = void (*)(const void* arg, int32_t part, int32_t parts);

// parts in [1, kPoolMaxThreads] (the caller checks); parts == 1 runs fn on
// the calling thread alone.
void parallel_parts(int32_t parts, PartFn fn, const void* arg);

}  // namespace atlas
