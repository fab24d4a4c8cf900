// Runtime of bscompile's CUDA emulator: CUDA threads as fibers, one OS thread.
//
// A launch runs its thread blocks one after another (or, in co-resident mode, all at
// once); the threads of a block are fibers switched by a small hand-written context
// switch (x86-64; ucontext elsewhere). A fiber runs until it reaches a barrier, a warp
// shuffle or a spin-wait (__nanosleep), so threads interleave at exactly the points a
// GPU orders them, and nowhere else may a kernel rely on an order. The scheduler visits
// threads and blocks forward, in reverse or in a seeded random order, so a race that
// depends on the order changes the answer. Everything a GPU would reject or
// mis-execute is reported as an error of the launch (see cuemu_fail).
#include <sys/mman.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#endif
#if defined(CUEMU_TSAN)
// TSan mode: the kernels are instrumented, this runtime is not (its bookkeeping would race
// by design); it tells TSan that each CUDA thread is a fiber and which events order them:
// launch start and end, barriers (per block), shuffles (per warp). Nothing orders two
// blocks of a launch, so a cross-block race is reported as a data race.
#include <sanitizer/tsan_interface.h>
#define TSAN(...) __VA_ARGS__
#else
#define TSAN(...)
#endif

extern "C" int TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);

namespace {

enum State { RUNNABLE, AT_BARRIER, AT_SHFL, DONE };
constexpr int kShflSync = 4;  // __syncwarp: a shuffle without data
constexpr uint64_t kStaticSharedLimit = 48 * 1024;
constexpr uint64_t kArenaBytes = 256 * 1024;

struct Block;

struct Fiber {
  cuemu_thread t;
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack = nullptr;  // usable stack (above a guard page)
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
  void* tsan = nullptr;        // TSan's fiber
  State state = DONE;
  bool spun = false;
  int linear = 0, lane = 0;
  Block* block = nullptr;
  int bar_line = 0;
  int shared_idx = 0;
  // pending shuffle
  int sh_kind = 0, sh_arg = 0, sh_width = 32, sh_line = 0;
  unsigned sh_mask = 0;
  uint64_t sh_val = 0, sh_result = 0;
};

struct Block {
  uint3 idx{};
  std::vector<Fiber*> fibers;  // by linear thread id
  int live = 0, done = 0, at_barrier = 0, bar_line = 0;
  char* arena = nullptr;
  uint64_t arena_used = 0, static_bytes = 0, dyn_bytes = 0;
  std::vector<std::pair<char*, uint64_t>> shared;  // static allocations in declaration order
  char bar_sync = 0, warp_sync[32] = {};          // TSan happens-before objects
};

struct LogEntry {
  std::string name;
  unsigned dims[6];
  uint64_t dyn;
};

// ---------------------------------------------------------------- state
struct Config {
  int order = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 1;
  int coresident = -1;  // 1 all blocks at once, 0 one block at a time, -1 auto: at once if the kernel spin-waits
  uint64_t spin_limit = 200000;  // scheduler rounds in which only spin-waits ran
  bool env_read = false;
} cfg;

void* g_sched_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif
const void* g_sched_stack_bottom = nullptr;
size_t g_sched_stack_size = 0;
void* g_sched_fake_stack = nullptr;
Fiber* g_running = nullptr;
void (*g_body)(void*) = nullptr;
void* g_args = nullptr;
const char* g_kernel = "";
std::string g_error;
bool g_failed = false;
uint64_t g_progress = 0;
uint64_t g_rng = 1;
std::vector<Fiber*> g_pool;  // fibers with stacks, reused across launches
std::vector<Block*> g_blocks;
std::vector<LogEntry> g_log;
size_t g_stack_bytes = 0;
bool g_coresident = false;  // this launch's blocks run at once
TSAN(void* g_tsan_sched = nullptr; char g_launch_sync = 0; char g_launch_done = 0; std::vector<char*> g_tsan_arenas;)

uint64_t next_rand() {  // xorshift64*
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 2685821657736338717ULL;
}

template <class T> void permute(std::vector<T>& v) {
  if (cfg.order == 1) {
    std::reverse(v.begin(), v.end());
  } else if (cfg.order == 2) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_rand() % i]);
  }
}

std::string where(const Fiber* f) {
  char buf[160];
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", f->t.bid.x, f->t.bid.y,
           f->t.bid.z, f->t.tid.x, f->t.tid.y, f->t.tid.z);
  return buf;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
extern "C" void cuemu_switch_ctx(void** save_sp, void* new_sp);
asm(R"(
.text
.globl cuemu_switch_ctx
.hidden cuemu_switch_ctx
.type cuemu_switch_ctx,@function
cuemu_switch_ctx:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuemu_switch_ctx, .-cuemu_switch_ctx
)");
#endif

void fiber_main();

// Scheduler -> fiber.
void resume(Fiber* f) {
  g_running = f;
  cuemu_cur = &f->t;
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake_stack, f->stack, f->stack_size);
#endif
  TSAN(__tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);)
#if defined(__x86_64__)
  cuemu_switch_ctx(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched_uc, &f->uc);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake_stack, nullptr, nullptr);
#endif
  g_running = nullptr;
}

// Fiber -> scheduler (the fiber is resumed later unless it is DONE or the launch failed).
void to_scheduler() {
  Fiber* f = g_running;
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(f->state == DONE || g_failed ? nullptr : &f->fake_stack, g_sched_stack_bottom,
                                 g_sched_stack_size);
#endif
  TSAN(__tsan_switch_to_fiber(g_tsan_sched, __tsan_switch_to_fiber_no_sync);)
#if defined(__x86_64__)
  cuemu_switch_ctx(&f->sp, g_sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  Fiber* f = g_running;
  f->state = RUNNABLE;
  TSAN(__tsan_acquire(&g_launch_sync);)
  g_body(g_args);
  TSAN(__tsan_release(&g_launch_done);)
  f->state = DONE;
  Block* b = f->block;
  b->live--;
  b->done++;
  g_progress++;
  if (b->at_barrier > 0 && !g_failed) {
    Fiber* w = nullptr;
    for (Fiber* o : b->fibers)
      if (o->state == AT_BARRIER) { w = o; break; }
    char buf[512];
    snprintf(buf, sizeof buf,
             "barrier divergence: %s exited while %s (and %d more) wait in __syncthreads at line %d",
             where(f).c_str(), w ? where(w).c_str() : "?", b->at_barrier - 1, b->bar_line);
    g_error = std::string("cuda emulator: ") + g_kernel + ": " + buf;
    g_failed = true;
  }
  to_scheduler();
  abort();  // a finished fiber is never resumed
}

void init_fiber(Fiber* f) {
#if defined(CUEMU_TSAN)
  if (f->tsan) __tsan_destroy_fiber(f->tsan);
  f->tsan = __tsan_create_fiber(0);
  if (f->stack) {  // a fresh stack: TSan must not see one thread's locals reused by another
    munmap(f->stack - 4096, f->stack_size + 4096);
    f->stack = nullptr;
  }
#endif
  if (!f->stack) {
    size_t page = 4096;
    size_t total = g_stack_bytes + page;
    char* mem = static_cast<char*>(
        mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (mem == MAP_FAILED) {
      fprintf(stderr, "cuda emulator: out of memory for thread stacks\n");
      abort();
    }
    mprotect(mem, page, PROT_NONE);  // guard: a stack overflow faults instead of corrupting
    f->stack = mem + page;
    f->stack_size = g_stack_bytes;
  }
#ifdef CUEMU_ASAN
  __asan_unpoison_memory_region(f->stack, f->stack_size);
#endif
  f->fake_stack = nullptr;
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                           // fake return address of fiber_main
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);     // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;               // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ULL | (0x037FULL << 32);               // mxcsr, x87 control word
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_main, 0);
#endif
  f->state = RUNNABLE;
  f->spun = false;
  f->shared_idx = 0;
}

void read_env() {
  if (cfg.env_read) return;
  cfg.env_read = true;
  if (const char* o = getenv("BSCOMPILE_CUDA_EMU_ORDER")) {
    if (!strncmp(o, "reverse", 7)) cfg.order = 1;
    if (!strncmp(o, "random", 6)) {
      cfg.order = 2;
      if (const char* c = strchr(o, ':')) cfg.seed = strtoull(c + 1, nullptr, 10);
    }
  }
  if (const char* c = getenv("BSCOMPILE_CUDA_EMU_CORESIDENT")) cfg.coresident = atoi(c);
}

// Run fibers until all are done; barriers and shuffles release themselves, so a round
// in which nothing could run is a deadlock.
void run(std::vector<Fiber*> fs) {
  uint64_t idle_rounds = 0;
  std::vector<Fiber*> order = fs;
  permute(order);
  while (!g_failed) {
    if (cfg.order == 2) permute(order);  // a fresh interleaving every round
    bool ran = false, all_done = true;
    uint64_t before = g_progress;
    bool only_spins = true;
    for (Fiber* f : order) {
      if (f->state == DONE) continue;
      all_done = false;
      if (f->state != RUNNABLE) continue;
      f->spun = false;
      resume(f);
      ran = true;
      if (!f->spun) only_spins = false;
      if (g_failed) return;
    }
    if (all_done) return;
    if (ran && !(only_spins && g_progress == before)) {
      idle_rounds = 0;
      continue;
    }
    if (ran && ++idle_rounds < cfg.spin_limit) continue;
    // deadlock: say who waits for whom
    std::string msg = ran ? "deadlock: threads spin-wait (__nanosleep) with no progress for " +
                                std::to_string(cfg.spin_limit) + " rounds"
                          : "deadlock: no thread can run";
    if (!g_coresident && ran)
      msg += " (blocks run one at a time here: a kernel whose blocks wait for each other needs co-resident "
             "blocks, i.e. a cooperative launch)";
    int shown = 0;
    for (Fiber* f : fs) {
      if (f->state == AT_SHFL && shown < 4) {
        for (int l = 0; l < 32; ++l) {
          if (!(f->sh_mask >> l & 1)) continue;
          int lin = f->linear - f->lane + l;
          Block* b = f->block;
          if (lin >= (int)b->fibers.size()) continue;
          Fiber* o = b->fibers[lin];
          if (o->state == AT_SHFL) continue;
          msg += "; " + where(f) + " waits in a warp shuffle (mask 0x";
          char hex[16];
          snprintf(hex, sizeof hex, "%08x", f->sh_mask);
          msg += hex;
          msg += ", line " + std::to_string(f->sh_line) + ") for lane " + std::to_string(l) + ", which " +
                 (o->state == DONE ? std::string("has exited")
                                   : "waits in __syncthreads at line " + std::to_string(o->bar_line));
          shown++;
          break;
        }
      } else if (f->state == AT_BARRIER && shown < 4 && f->block->at_barrier > 0) {
        msg += "; " + where(f) + " waits in __syncthreads at line " + std::to_string(f->bar_line) + " (" +
               std::to_string(f->block->at_barrier) + " of " + std::to_string(f->block->live) +
               " live threads of its block arrived)";
        shown++;
      } else if (f->state == RUNNABLE && f->spun && shown < 4) {
        msg += "; " + where(f) + " spins";
        shown++;
      }
    }
    g_error = std::string("cuda emulator: ") + g_kernel + ": " + msg;
    g_failed = true;
  }
}

[[noreturn]] void fiber_fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string what = vformat(fmt, ap);
  va_end(ap);
  Fiber* f = g_running;
  g_error = std::string("cuda emulator: ") + g_kernel + ": " + where(f) + ": " + what;
  g_failed = true;
  to_scheduler();
  abort();
}

Block* get_block(size_t i) {
  while (g_blocks.size() <= i) {
    Block* b = new Block();
    b->arena = static_cast<char*>(aligned_alloc(256, kArenaBytes));
    g_blocks.push_back(b);
  }
  return g_blocks[i];
}

Fiber* get_fiber(size_t i) {
  while (g_pool.size() <= i) g_pool.push_back(new Fiber());
  return g_pool[i];
}

}  // namespace

// ---------------------------------------------------------------- built-ins (called from kernels)
extern "C" {

cuemu_thread* cuemu_cur = nullptr;

void cuemu_syncthreads(int line) {
  Fiber* f = g_running;
  Block* b = f->block;
  if (b->done > 0) {
    Fiber* gone = nullptr;
    for (Fiber* o : b->fibers)
      if (o->state == DONE) { gone = o; break; }
    fiber_fail("barrier divergence: __syncthreads at line %d is not reached by %s (it has exited)", line,
               gone ? where(gone).c_str() : "?");
  }
  if (b->at_barrier > 0 && b->bar_line != line)
    fiber_fail("barrier divergence: __syncthreads at line %d while other threads of the block wait in the one at "
               "line %d", line, b->bar_line);
  g_progress++;
  b->bar_line = line;
  f->bar_line = line;
  TSAN(__tsan_release(&b->bar_sync);)
  if (++b->at_barrier == b->live) {  // last to arrive releases the block
    for (Fiber* o : b->fibers)
      if (o->state == AT_BARRIER) o->state = RUNNABLE;
    b->at_barrier = 0;
    TSAN(__tsan_acquire(&b->bar_sync);)
    return;
  }
  f->state = AT_BARRIER;
  to_scheduler();
  TSAN(__tsan_acquire(&b->bar_sync);)
}

static void shfl_arrive(Fiber* f, int kind, unsigned mask, uint64_t value, int arg, int width, int line) {
  Block* b = f->block;
  if (!(mask >> f->lane & 1))
    fiber_fail("warp shuffle at line %d with mask 0x%08x, which does not include the calling lane %d", line, mask,
               f->lane);
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fiber_fail("warp shuffle at line %d with width %d (must be a power of two <= 32)", line, width);
  f->sh_kind = kind;
  f->sh_mask = mask;
  f->sh_val = value;
  f->sh_arg = arg;
  f->sh_width = width;
  f->sh_line = line;
  f->state = AT_SHFL;
  g_progress++;
  int base = f->linear - f->lane;
  TSAN(char* wsync = &b->warp_sync[f->linear / 32]; __tsan_release(wsync);)
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    if (base + l >= (int)b->fibers.size())
      fiber_fail("warp shuffle at line %d: mask 0x%08x names lane %d, which does not exist (the block has %zu "
                 "threads)", line, mask, l, b->fibers.size());
    Fiber* o = b->fibers[base + l];
    if (o->state == DONE)
      fiber_fail("warp shuffle at line %d: lane %d of the mask 0x%08x has exited and never arrives", line, l, mask);
    if (o->state != AT_SHFL) {  // not everyone is here yet
      to_scheduler();
      TSAN(__tsan_acquire(wsync);)
      return;
    }
  }
  TSAN(__tsan_acquire(wsync);)
  // everyone in the mask is waiting in a shuffle: they must be the same one
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Fiber* o = b->fibers[base + l];
    if (o->sh_line != line || o->sh_mask != mask || o->sh_kind != kind)
      fiber_fail("warp divergence: lane %d is in a shuffle at line %d (mask 0x%08x), lane %d in one at line %d (mask "
                 "0x%08x)", f->lane, line, mask, l, o->sh_line, o->sh_mask);
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Fiber* o = b->fibers[base + l];
    int seg = l & ~(o->sh_width - 1);
    int src = l;
    switch (kind) {
      case CUEMU_SHFL_IDX: src = seg + (o->sh_arg & (o->sh_width - 1)); break;
      case CUEMU_SHFL_UP: src = (l - seg) - o->sh_arg >= 0 ? l - o->sh_arg : l; break;
      case CUEMU_SHFL_DOWN: src = (l - seg) + o->sh_arg < o->sh_width ? l + o->sh_arg : l; break;
      case CUEMU_SHFL_XOR: src = ((l - seg) ^ o->sh_arg) < o->sh_width ? l ^ o->sh_arg : l; break;
      default: break;
    }
    if (kind != kShflSync && !(mask >> src & 1)) {
      g_running = o;  // report it as the reading lane's fault
      fiber_fail("warp shuffle at line %d reads lane %d, which is outside the mask 0x%08x (undefined value)", line,
                 src, mask);
    }
    o->sh_result = b->fibers[base + src]->sh_val;
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) b->fibers[base + l]->state = RUNNABLE;
}

uint64_t cuemu_shfl(int kind, unsigned mask, uint64_t value, int arg, int width, int line) {
  Fiber* f = g_running;
  shfl_arrive(f, kind, mask, value, arg, width, line);
  return f->sh_result;
}

void cuemu_syncwarp(unsigned mask, int line) { shfl_arrive(g_running, kShflSync, mask, 0, 0, 32, line); }

void cuemu_yield(void) {
  g_running->spun = true;
  to_scheduler();
}

void cuemu_threadfence(void) {}

unsigned cuemu_activemask(void) {
  Fiber* f = g_running;
  Block* b = f->block;
  int base = f->linear - f->lane;
  unsigned m = 0;
  for (int l = 0; l < 32 && base + l < (int)b->fibers.size(); ++l)
    if (b->fibers[base + l]->state != DONE) m |= 1u << l;
  return m;
}

// The k-th __shared__ declaration a thread executes is the block's k-th allocation.
void* cuemu_shared(uint64_t bytes, uint64_t align, int line) {
  Fiber* f = g_running;
  Block* b = f->block;
  size_t k = f->shared_idx++;
  if (k < b->shared.size()) {
    if (b->shared[k].second != bytes)
      fiber_fail("__shared__ declaration at line %d: %" PRIu64 " bytes here, %" PRIu64 " in another thread", line,
                 bytes, b->shared[k].second);
    return b->shared[k].first;
  }
  if (align < 16) align = 16;
  uint64_t off = (b->arena_used + align - 1) / align * align;
  b->static_bytes += bytes;
  if (b->static_bytes > kStaticSharedLimit)
    fiber_fail("static shared memory of %" PRIu64 " bytes exceeds the 48 KiB a kernel may declare statically",
               b->static_bytes);
  if (off + bytes > kArenaBytes) fiber_fail("shared memory exhausted (%" PRIu64 " bytes)", off + bytes);
  char* p = b->arena + off;
#if !defined(CUEMU_TSAN)  // (TSan mode: the scheduler poisoned the whole arena, ordered before the block)
  memset(p, 0xFF, bytes);  // poison: uninitialised floats read as NaN, ints as -1
#endif
  b->arena_used = off + bytes;
  b->shared.emplace_back(p, bytes);
  return p;
}

void* cuemu_dyn_shared(void) { return g_running->block->arena; }

// ---------------------------------------------------------------- launch
void cuemu_configure(int order, uint64_t seed, int coresident, uint64_t spin_limit) {
  cfg.env_read = true;
  cfg.order = order;
  cfg.seed = seed ? seed : 1;
  cfg.coresident = coresident;
  if (spin_limit) cfg.spin_limit = spin_limit;
}

uint64_t cuemu_log_size(void) { return g_log.size(); }
const char* cuemu_log_entry(uint64_t i, unsigned* dims, uint64_t* dyn) {
  if (i >= g_log.size()) return nullptr;
  memcpy(dims, g_log[i].dims, sizeof g_log[i].dims);
  *dyn = g_log[i].dyn;
  return g_log[i].name.c_str();
}
void cuemu_log_clear(void) { g_log.clear(); }

static int launch_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = std::string("cuda emulator: ") + g_kernel + ": " + vformat(fmt, ap);
  va_end(ap);
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", msg.c_str());
  return -1;
}

// Arguments as TVM passes them (TVMFFIAny: int32 type index, 4 bytes, 8-byte value).
struct AnyView {
  int32_t type_index;
  uint32_t pad;
  union { int64_t i; double d; void* p; };
};

void* cuemu_arg_ptr(const void* args, int i) {
  const AnyView* a = static_cast<const AnyView*>(args) + i;
  if (a->type_index == 0) return nullptr;         // None
  if (a->type_index == 7) return *static_cast<void**>(a->p);  // DLTensor*: data is its first field
  return a->p;
}
int64_t cuemu_arg_int(const void* args, int i) {
  const AnyView* a = static_cast<const AnyView*>(args) + i;
  return a->type_index == 3 ? static_cast<int64_t>(a->d) : a->i;
}
double cuemu_arg_float(const void* args, int i) {
  const AnyView* a = static_cast<const AnyView*>(args) + i;
  return a->type_index == 3 ? a->d : static_cast<double>(a->i);
}

// dims: gridDim.xyz, blockDim.xyz.
// spins: the kernel spin-waits (__nanosleep), i.e. its blocks wait for each other.
int cuemu_launch(const char* name, int launch_bounds, void (*body)(void*), void* args, const unsigned* dims,
                 uint64_t dyn_smem, int spins) {
  read_env();
  g_kernel = name;
  g_error.clear();
  g_failed = false;
  LogEntry e;
  e.name = name;
  memcpy(e.dims, dims, sizeof e.dims);
  e.dyn = dyn_smem;
  g_log.push_back(e);
  const unsigned gx = dims[0], gy = dims[1], gz = dims[2], bx = dims[3], by = dims[4], bz = dims[5];
  uint64_t threads = uint64_t(bx) * by * bz, blocks = uint64_t(gx) * gy * gz;
  if (!threads || !blocks)
    return launch_error("invalid launch configuration: grid (%u,%u,%u) block (%u,%u,%u)", gx, gy, gz, bx, by, bz);
  if (threads > 1024 || bx > 1024 || by > 1024 || bz > 64)
    return launch_error("block (%u,%u,%u) exceeds the hardware limits (1024 threads; x, y <= 1024, z <= 64)", bx, by,
                        bz);
  if (gx > 0x7FFFFFFFu || gy > 65535 || gz > 65535)
    return launch_error("grid (%u,%u,%u) exceeds the hardware limits (x < 2^31, y, z <= 65535)", gx, gy, gz);
  if (launch_bounds > 0 && threads > uint64_t(launch_bounds))
    return launch_error("block of %" PRIu64 " threads (%u,%u,%u) exceeds the kernel's __launch_bounds__(%d)", threads,
                        bx, by, bz, launch_bounds);
  if (dyn_smem > 227 * 1024)
    return launch_error("%" PRIu64 " bytes of dynamic shared memory exceed the 227 KiB of a thread block", dyn_smem);
  g_coresident = cfg.coresident == 1 || (cfg.coresident < 0 && spins);
  if (g_coresident && blocks * threads > (1u << 20))
    return launch_error("co-resident mode: %" PRIu64 " threads are too many to run at once", blocks * threads);
  if (!g_stack_bytes) {
#ifdef CUEMU_ASAN
    g_stack_bytes = 256 * 1024;
#else
    g_stack_bytes = 64 * 1024;
#endif
  }
  g_rng = cfg.seed * 0x9E3779B97F4A7C15ULL + 1;
  g_body = body;
  g_args = args;
  std::vector<uint64_t> block_order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) block_order[i] = i;
  permute(block_order);
  uint64_t group = g_coresident ? blocks : 1;  // blocks running at once
  for (uint64_t start = 0; start < blocks && !g_failed; start += group) {
    std::vector<Fiber*> fs;
    for (uint64_t j = 0; j < group; ++j) {
      uint64_t bi = block_order[start + j];
      Block* b = get_block(j);
      b->idx = make_uint3(unsigned(bi % gx), unsigned(bi / gx % gy), unsigned(bi / (uint64_t(gx) * gy)));
      b->fibers.clear();
      b->live = int(threads);
      b->done = b->at_barrier = b->bar_line = 0;
      b->static_bytes = 0;
      b->shared.clear();
      b->dyn_bytes = dyn_smem;
      b->arena_used = (dyn_smem + 255) / 256 * 256;
#if defined(CUEMU_TSAN)
      // fresh shared memory per block, freed when the launch is over: nothing orders one
      // block's accesses before another's, and the scheduler must not look as if it did
      g_tsan_arenas.push_back(b->arena);
      b->arena = static_cast<char*>(aligned_alloc(256, kArenaBytes));
      memset(b->arena, 0xFF, kArenaBytes);
#else
      memset(b->arena, 0xFF, b->arena_used);
#endif
      for (uint64_t t = 0; t < threads; ++t) {
        Fiber* f = get_fiber(j * threads + t);
        init_fiber(f);
        f->block = b;
        f->linear = int(t);
        f->lane = int(t % 32);
        f->t.tid = make_uint3(unsigned(t % bx), unsigned(t / bx % by), unsigned(t / (uint64_t(bx) * by)));
        f->t.bid = b->idx;
        f->t.bdim = dim3{bx, by, bz};
        f->t.gdim = dim3{gx, gy, gz};
        b->fibers.push_back(f);
        fs.push_back(f);
      }
    }
    TSAN(g_tsan_sched = __tsan_get_current_fiber(); __tsan_release(&g_launch_sync);)
    run(fs);
  }
  TSAN(__tsan_acquire(&g_launch_done); for (char* a : g_tsan_arenas) free(a); g_tsan_arenas.clear();)
  cuemu_cur = nullptr;
  if (g_failed) {
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", g_error.c_str());
    return -1;
  }
  return 0;
}

const char* cuemu_last_error(void) { return g_error.c_str(); }

#if !defined(CUEMU_SANITIZE)
// -fsanitize=alignment without the UBSan runtime: a misaligned typed access (a float4
// load from an address that is not 16-byte aligned faults on the GPU) lands here.
struct CuemuSourceLocation { const char* file; uint32_t line, column; };
struct CuemuTypeDescriptor { uint16_t kind, info; char name[1]; };
struct CuemuTypeMismatch {
  CuemuSourceLocation loc;
  const CuemuTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
static void type_mismatch(CuemuTypeMismatch* d, uintptr_t ptr) {
  uint64_t align = uint64_t(1) << d->log_alignment;
  if (!g_running) {
    fprintf(stderr, "cuda emulator: misaligned access outside a kernel\n");
    abort();
  }
  if (ptr == 0) fiber_fail("null pointer access at line %u", d->loc.line);
  fiber_fail("misaligned access at line %u: address 0x%" PRIxPTR " of a %s needs %" PRIu64
             "-byte alignment (the GPU raises a misaligned address error)", d->loc.line, ptr, d->type->name, align);
}
void __ubsan_handle_type_mismatch_v1(CuemuTypeMismatch* d, uintptr_t ptr) { type_mismatch(d, ptr); }
void __ubsan_handle_type_mismatch_v1_abort(CuemuTypeMismatch* d, uintptr_t ptr) { type_mismatch(d, ptr); }
#endif

}  // extern "C"
