// The simulator's launch engine: runs one kernel launch of the host build with the execution model
// and checks described in sim_shim.h. A launch's blocks are shared out among slots (OS threads owned
// by the calling thread, which is a stream's worker in the driver); a slot runs one block at a time,
// every CUDA thread of it a fiber on the slot's thread, scheduled round-robin (or in a random order
// in the scheduling mode) between the points where CUDA threads meet.
//
// Faults never take the process down: memory faults (a guard page, a misaligned access trapped by
// -fsanitize=alignment, a fiber's stack overflowing into its guard page) arrive as signals on the
// slot's thread and are turned into a fault of the fiber that ran; every other check raises a fault
// directly. The first fault of a launch wins; the other fibers unwind when they next run, the other
// slots stop taking blocks, and ptsim_run returns the fault.
#include "sim_abi.h"
#include "sim_shim.h"
#include "sim_warp_ops.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <stdexcept>

#ifdef PTSIM_TSAN
extern "C" {
void *__tsan_get_current_fiber(void);
void *__tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void *fiber);
void __tsan_switch_to_fiber(void *fiber, unsigned flags);
}
#endif

#if !defined(__x86_64__)
#error "the simulator's fiber switch is written for x86-64"
#endif

// ptsim_switch_context(save, to): saves the callee-saved registers, the SSE and x87 control words
// and the stack pointer into *save, then resumes the context whose stack pointer is `to`.
asm(R"(
    .text
    .globl ptsim_switch_context
    .hidden ptsim_switch_context
    .type ptsim_switch_context, @function
ptsim_switch_context:
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
    .size ptsim_switch_context, .-ptsim_switch_context

    .globl ptsim_fiber_start
    .hidden ptsim_fiber_start
    .type ptsim_fiber_start, @function
ptsim_fiber_start:
    movq %rbx, %rdi
    call ptsim_fiber_main
    ud2
    .size ptsim_fiber_start, .-ptsim_fiber_start
)");

extern "C" void ptsim_switch_context(void **save, void *to);
extern "C" void ptsim_fiber_start();

namespace ptsim {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMaxSmem = 232448;  // sm_90's opt-in maximum; the driver checks the real limit
constexpr size_t kFrontCanary = 256; // bytes before shared memory checked after every block
constexpr unsigned char kCanary = 0xa5;
constexpr size_t kFiberStack = 256 << 10;
constexpr size_t kSignalStack = 64 << 10;

// Mutation hooks (tests): a barrier skipped, a wait_group count changed.
struct Mutation {
    std::string file;
    unsigned line = 0;
    int delta = 0;
    bool active = false;
};
Mutation g_skip_barrier, g_wait_group;
std::mutex g_mutation_mu;

bool site_matches(const Mutation &m, const Site &s) {
    if (!m.active || s.line() != m.line) return false;
    const std::string f = s.file_name();
    return f.size() >= m.file.size() && f.compare(f.size() - m.file.size(), m.file.size(), m.file) == 0;
}

Mutation parse_mutation(const char *spec, bool with_delta) {
    Mutation m;
    if (!spec || !*spec) return m;
    std::string s = spec;
    size_t c1 = s.find(':');
    if (c1 == std::string::npos) return m;
    m.file = s.substr(0, c1);
    std::string rest = s.substr(c1 + 1);
    if (with_delta) {
        size_t c2 = rest.find(':');
        if (c2 == std::string::npos) return m;
        m.delta = std::atoi(rest.c_str() + c2 + 1);
        rest = rest.substr(0, c2);
    }
    m.line = static_cast<unsigned>(std::atoi(rest.c_str()));
    m.active = m.line > 0;
    return m;
}

// A mapping of `bytes` (rounded to pages) followed by (or, with `guard_below`, preceded by) an
// inaccessible guard page.
struct Mapping {
    unsigned char *map = nullptr;
    size_t len = 0;
    unsigned char *lo = nullptr, *hi = nullptr; // the accessible range
    Mapping(size_t bytes, bool guard_below) {
        const size_t data = (bytes + kPage - 1) / kPage * kPage;
        len = data + kPage;
        void *p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) throw std::runtime_error("simulator: cannot map memory");
        map = static_cast<unsigned char *>(p);
        if (guard_below) {
            mprotect(map, kPage, PROT_NONE);
            lo = map + kPage;
            hi = map + len;
        } else {
            lo = map;
            hi = map + data;
            mprotect(hi, kPage, PROT_NONE);
        }
    }
    ~Mapping() { munmap(map, len); }
    Mapping(const Mapping &) = delete;
    Mapping &operator=(const Mapping &) = delete;
};

} // namespace

struct Launch;

// One CUDA thread: its state and its stack.
struct Fiber {
    ThreadState ts;
    Mapping stack{kFiberStack, true};
    void *sp = nullptr;
    bool done = false;
    bool started = false; // switched into in this block already
    sigjmp_buf env;
    Launch *launch = nullptr;
    struct Slot *slot = nullptr;
#ifdef PTSIM_TSAN
    void *tsan = nullptr;
#endif
};

// One resident block: its state, shared memory (ending at a guard page, so an access past the end
// of the launch's dynamic shared memory faults), its fibers and the slot's OS thread.
struct Slot {
    Block block;
    Mapping arena{kMaxSmem + kFrontCanary, false};
    std::vector<std::unique_ptr<Fiber>> fibers;
    void *sched_sp = nullptr;
#ifdef PTSIM_TSAN
    void *sched_tsan = nullptr;
#endif
    Fiber *current = nullptr;
    // ThreadSanitizer: released by the scheduler when a block starts and acquired by each CUDA
    // thread when it starts; released by each thread when it ends and acquired by the scheduler
    // when the block is done. So the block's set-up happens before its threads and its threads
    // before what follows, while the threads of a block stay unordered among themselves except
    // by their barriers (as on the GPU).
    char start_token = 0, end_token = 0;
    uint64_t rng = 0;
    uint64_t jitter_yields = 0;
    pthread_t thread{};
};

struct Launch {
    const ptsim_kernel_desc *kernel = nullptr;
    Dim3 grid, block;
    size_t smem = 0;
    unsigned threads = 0;
    uint64_t n_blocks = 0;
    void *const *args = nullptr;
    ptsim_options opt{};
    std::vector<uint64_t> order;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> aborted{false};
    std::mutex fault_mu;
    bool faulted = false;
    ptsim_fault *fault = nullptr;
};

namespace {

thread_local Launch *t_launch = nullptr;
thread_local Slot *t_slot = nullptr;

// What a signal handler saw (formatted into a fault after the jump, outside the handler).
struct SignalInfo {
    int signo = 0;
    uintptr_t addr = 0;
    uintptr_t pc = 0;
    int is_write = -1;
};
thread_local SignalInfo t_signal;

std::string describe_pc(uintptr_t pc) {
    Dl_info info;
    if (pc && dladdr(reinterpret_cast<void *>(pc), &info) && info.dli_sname) {
        int status = 0;
        char *dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
        std::string name = status == 0 && dem ? dem : info.dli_sname;
        std::free(dem);
        if (name.size() > 160) name = name.substr(0, 157) + "...";
        char buf[64];
        std::snprintf(buf, sizeof buf, "+0x%zx", static_cast<size_t>(pc - reinterpret_cast<uintptr_t>(info.dli_saddr)));
        return name + buf;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, "0x%zx", static_cast<size_t>(pc));
    return buf;
}

void record(Launch &L, FaultKind kind, const std::string &message, uintptr_t addr, int is_write) {
    std::lock_guard<std::mutex> g(L.fault_mu);
    if (!L.faulted) {
        L.faulted = true;
        ptsim_fault *f = L.fault;
        f->kind = kind;
        f->address = addr;
        f->is_write = is_write;
        f->block[0] = blockIdx.x;
        f->block[1] = blockIdx.y;
        f->block[2] = blockIdx.z;
        f->thread[0] = threadIdx.x;
        f->thread[1] = threadIdx.y;
        f->thread[2] = threadIdx.z;
        std::string text = "kernel " + std::string(L.kernel->name) + ", block (" + std::to_string(blockIdx.x) + "," +
                           std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "): " + message;
        std::snprintf(f->message, sizeof f->message, "%s", text.c_str());
    }
    L.aborted.store(true, std::memory_order_seq_cst);
}

struct sigaction g_previous[32];
std::once_flag g_signals_once;

void on_signal(int sig, siginfo_t *si, void *ucv) {
    ThreadState *me = g_self;
    if (me && me->in_kernel && me->unwind) {
        me->in_kernel = false;
        t_signal.signo = sig;
        t_signal.addr = reinterpret_cast<uintptr_t>(si->si_addr);
        const auto *uc = static_cast<const ucontext_t *>(ucv);
        t_signal.pc = static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
        t_signal.is_write = sig == SIGSEGV ? ((uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0) : -1;
        siglongjmp(*me->unwind, 2);
    }
    // Not a simulated kernel: hand the signal to whoever had it before (e.g. Rust's stack-overflow
    // handler), or restore the default action so the fault repeats and ends the process as usual.
    struct sigaction &prev = g_previous[sig];
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) {
        prev.sa_sigaction(sig, si, ucv);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler) {
        prev.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
    }
}

void install_signal_handlers() {
    std::call_once(g_signals_once, [] {
        struct sigaction sa{};
        sa.sa_sigaction = on_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE}) sigaction(sig, &sa, &g_previous[sig]);
    });
}

uint64_t splitmix(uint64_t &x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

Dim3 decompose(uint64_t i, Dim3 d) {
    Dim3 r;
    r.x = static_cast<unsigned>(i % d.x);
    r.y = static_cast<unsigned>((i / d.x) % d.y);
    r.z = static_cast<unsigned>(i / (static_cast<uint64_t>(d.x) * d.y));
    return r;
}

// Sizes a slot's block state for the launch (when the block shape changed) and places its shared
// memory to end at the guard page.
PTSIM_NO_TSAN void prepare_slot(Slot &S, Launch &L) {
    Block &b = S.block;
    if (b.threads != L.threads) {
        b.threads = L.threads;
        b.n_warps = (L.threads + 31) / 32;
        b.warps = std::make_unique<Warp[]>(b.n_warps);
        for (unsigned w = 0; w < b.n_warps; ++w) {
            b.warps[w].lanes = std::min(32u, L.threads - 32 * w);
            b.warps[w].bar.n = static_cast<int>(b.warps[w].lanes);
        }
        b.bar.n = static_cast<int>(L.threads);
        b.arrival_file = std::make_unique<const char *[]>(L.threads);
        b.arrival_line = std::make_unique<unsigned[]>(L.threads);
    }
    while (S.fibers.size() < L.threads) {
        auto f = std::make_unique<Fiber>();
        f->slot = &S;
#ifdef PTSIM_TSAN
        f->tsan = __tsan_create_fiber(0);
#endif
        S.fibers.push_back(std::move(f));
    }
    const size_t bytes = (L.smem + 15) / 16 * 16;
    b.smem = S.arena.hi - bytes;
    b.smem_bytes = L.smem;
    const size_t chunks = bytes / 16;
    if (b.shadow_len < chunks) {
        b.shadow = std::make_unique<Chunk[]>(chunks);
        b.shadow_len = chunks;
    }
}

// Prepares the slot's block for block `linear` of the launch.
PTSIM_NO_TSAN void reset_block(Launch &L, Slot &S, uint64_t linear) {
    Block &b = S.block;
    b.exited = 0;
    b.bar.count = 0;
    ++b.epoch; // a fresh barrier interval
    for (unsigned w = 0; w < b.n_warps; ++w) {
        b.warps[w].exited = 0;
        b.warps[w].bar.count = 0;
    }
    for (size_t i = 0; i < (L.smem + 15) / 16; ++i) b.shadow[i] = Chunk{};
    for (unsigned t = 0; t < L.threads; ++t) {
        b.arrival_file[t] = "";
        b.arrival_line[t] = 0;
    }
    std::memset(b.smem, 0xff, L.smem); // initcheck: unwritten shared memory reads as NaN
    const size_t front = std::min(kFrontCanary, static_cast<size_t>(b.smem - S.arena.lo));
    std::memset(b.smem - front, kCanary, front);
    blockIdx = decompose(linear, L.grid);
    blockDim = L.block;
    gridDim = L.grid;
}

// After a block: was anything written just before the start of shared memory?
PTSIM_NO_TSAN void check_front_canary(Launch &L, Slot &S) {
    Block &b = S.block;
    const size_t front = std::min(kFrontCanary, static_cast<size_t>(b.smem - S.arena.lo));
    for (size_t i = 0; i < front; ++i) {
        if (b.smem[-static_cast<ptrdiff_t>(front) + static_cast<ptrdiff_t>(i)] != kCanary) {
            record(L, FAULT_ILLEGAL_ADDRESS,
                   "shared memory written " + std::to_string(front - i) + " bytes before its start (out of bounds)", 0, 1);
            return;
        }
    }
}

// A fiber's first frame: ptsim_switch_context "returns" into ptsim_fiber_start, which passes
// the fiber (rbx) to ptsim_fiber_main.
PTSIM_NO_TSAN void init_fiber(Fiber &f, Launch &L, unsigned tid) {
    f.launch = &L;
    f.done = false;
    f.started = false;
    ThreadState &ts = f.ts;
    ts.block = &f.slot->block;
    ts.tid = tid;
    ts.lane = tid % 32;
    ts.warp_index = tid / 32;
    ts.warp = &f.slot->block.warps[tid / 32];
    ts.phase = 0;
    ts.in_kernel = false;
    ts.unwind = &f.env;
    ts.pending.clear();
    ts.open_group = 0;
    ts.thread_idx = decompose(tid, L.block);
    auto *top = reinterpret_cast<uint64_t *>(reinterpret_cast<uintptr_t>(f.stack.hi) & ~uintptr_t{15});
    uint64_t *sp = top - 8;
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(&sp[0], csr, 8);
    sp[1] = 0;                                          // r15
    sp[2] = 0;                                          // r14
    sp[3] = 0;                                          // r13
    sp[4] = 0;                                          // r12
    sp[5] = reinterpret_cast<uint64_t>(&f);             // rbx: the fiber
    sp[6] = 0;                                          // rbp
    sp[7] = reinterpret_cast<uint64_t>(&ptsim_fiber_start); // return address
    f.sp = sp;
}

PTSIM_NO_TSAN void switch_to(Slot &S, Fiber &f) {
    S.current = &f;
    g_self = &f.ts;
    threadIdx = f.ts.thread_idx;
#ifdef PTSIM_TSAN
    // Switches never synchronise: the fibers race as the GPU's threads do (see Slot's tokens).
    __tsan_switch_to_fiber(f.tsan, 1);
#endif
    f.started = true;
    ptsim_switch_context(&S.sched_sp, f.sp);
    g_self = nullptr;
    S.current = nullptr;
}

// Runs one block on the slot's thread until all its fibers have ended. The default order is
// warp by warp: one warp's lanes run until that warp can go no further (all its lanes wait at a
// block barrier, or have ended), then the next warp. So one warp runs far ahead of the others
// between barriers, which makes a missing __syncthreads between warps show as stale or poisoned
// data deterministically. The scheduling mode visits the fibers in a random order every round.
PTSIM_NO_TSAN void run_block(Launch &L, Slot &S) {
    Block &b = S.block;
    const unsigned n = L.threads;
    for (unsigned t = 0; t < n; ++t) init_fiber(*S.fibers[t], L, t);
    PTSIM_TSAN_RELEASE(&S.start_token);
    std::vector<unsigned> order(n);
    for (unsigned t = 0; t < n; ++t) order[t] = t;
    unsigned live = n;
    auto run = [&](unsigned t) {
        Fiber &f = *S.fibers[t];
        if (f.done) return;
        switch_to(S, f);
        if (f.done) --live;
    };
    while (live > 0) {
        const uint64_t progress = b.progress + S.jitter_yields;
        if (L.opt.jitter) {
            for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix(S.rng) % i]);
            for (unsigned i = 0; i < n; ++i) run(order[i]);
        } else {
            for (unsigned w = 0; w < b.n_warps; ++w) {
                const unsigned lo = 32 * w, hi = std::min(n, lo + 32);
                for (;;) {
                    const uint64_t before = b.progress;
                    for (unsigned t = lo; t < hi; ++t) run(t);
                    if (b.progress == before || L.aborted.load(std::memory_order_relaxed)) break;
                }
            }
        }
        if (live > 0 && b.progress + S.jitter_yields == progress && !L.aborted.load(std::memory_order_relaxed)) {
            // No thread can move: say where they wait.
            std::string where_text;
            unsigned shown = 0;
            for (unsigned t = 0; t < n && shown < 4; ++t) {
                if (S.fibers[t]->done) continue;
                const Warp &w = *S.fibers[t]->ts.warp;
                where_text += (shown++ ? "; " : "") + thread_name(static_cast<int>(t)) + " at " +
                              (b.bar.count > 0 ? "the barrier at " + short_file(b.bar.file) + ":" + std::to_string(b.bar.line)
                                               : "a warp collective at " + short_file(w.bar.file) + ":" + std::to_string(w.bar.line));
            }
            g_self = &S.fibers[0]->ts;
            record(L, FAULT_SYNC, "deadlock: " + std::to_string(live) + " thread(s) wait and none can proceed (" + where_text + ")",
                   0, -1);
            g_self = nullptr;
        }
    }
    PTSIM_TSAN_ACQUIRE(&S.end_token);
}

} // namespace

// Where every fiber starts: the kernel, then the end-of-thread checks; faults jump back here.
extern "C" [[noreturn]] void ptsim_fiber_main(Fiber *f) {
    Launch &L = *f->launch;
    ThreadState &me = f->ts;
    PTSIM_TSAN_ACQUIRE(&f->slot->start_token);
    const int jumped = sigsetjmp(f->env, 1);
    if (jumped == 0) {
        if (!L.aborted.load(std::memory_order_relaxed)) {
            me.in_kernel = true;
            L.kernel->tramp(L.args);
            // Outstanding cp.async data lands when the thread ends.
            pt::sim_detail::land_groups(UINT64_MAX, Site::current());
            thread_exited();
        }
        me.in_kernel = false;
    } else {
        me.in_kernel = false;
        if (jumped == 2) {
            const SignalInfo si = t_signal;
            FaultKind kind = FAULT_ILLEGAL_ADDRESS;
            std::string what;
            char addr[64];
            std::snprintf(addr, sizeof addr, "0x%zx", static_cast<size_t>(si.addr));
            const bool own_stack = si.addr >= reinterpret_cast<uintptr_t>(f->stack.map) &&
                                   si.addr < reinterpret_cast<uintptr_t>(f->stack.lo);
            if (si.signo == SIGSEGV || si.signo == SIGBUS) {
                what = own_stack ? std::string("stack overflow (the simulator gives a CUDA thread ") +
                                       std::to_string(kFiberStack >> 10) + " KB)"
                                 : std::string("invalid ") +
                                       (si.is_write == 1 ? "write" : si.is_write == 0 ? "read" : "access") +
                                       " of address " + addr;
            } else if (si.signo == SIGILL) {
                kind = FAULT_MISALIGNED;
                what = "misaligned memory access (trapped by the alignment check)";
            } else {
                kind = FAULT_TRAP;
                what = "arithmetic trap (signal " + std::to_string(si.signo) + ")";
            }
            record(L, kind, what + " by " + thread_name(static_cast<int>(me.tid)) + " at " + describe_pc(si.pc),
                   kind == FAULT_ILLEGAL_ADDRESS && !own_stack ? si.addr : 0, si.is_write);
        }
    }
    f->done = true;
    Slot &S = *f->slot;
    PTSIM_TSAN_RELEASE(&S.end_token);
#ifdef PTSIM_TSAN
    __tsan_switch_to_fiber(S.sched_tsan, 1);
#endif
    void *dead = nullptr;
    ptsim_switch_context(&dead, S.sched_sp);
    __builtin_unreachable();
}

namespace {

// The slots of one owner thread (a simulated stream), reused by its launches.
class Pool {
  public:
    ~Pool() {
        {
            std::lock_guard<std::mutex> g(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto &s : slots_) pthread_join(s->thread, nullptr);
    }

    void run(Launch &L, unsigned slots) {
        grow(slots);
        {
            std::unique_lock<std::mutex> g(mu_);
            job_ = &L;
            job_slots_ = slots;
            busy_ = slots;
            ++seq_;
        }
        cv_.notify_all();
        std::unique_lock<std::mutex> g(mu_);
        done_cv_.wait(g, [&] { return busy_ == 0; });
        job_ = nullptr;
    }

  private:
    static void *thread_main(void *arg) {
        auto *self_arg = static_cast<std::pair<Pool *, unsigned> *>(arg);
        Pool *pool = self_arg->first;
        const unsigned index = self_arg->second;
        delete self_arg;
        // A signal stack of its own: a fault on a guard page is handled there.
        stack_t ss{};
        ss.ss_sp = std::malloc(kSignalStack);
        ss.ss_size = kSignalStack;
        sigaltstack(&ss, nullptr);
        pool->loop(index);
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
        std::free(ss.ss_sp);
        return nullptr;
    }

    void loop(unsigned index) {
        Slot &S = *slots_[index];
        t_slot = &S;
#ifdef PTSIM_TSAN
        S.sched_tsan = __tsan_get_current_fiber();
#endif
        uint64_t seen = 0;
        for (;;) {
            Launch *L;
            {
                std::unique_lock<std::mutex> g(mu_);
                cv_.wait(g, [&] { return stop_ || (job_ && seq_ != seen); });
                if (stop_) return;
                seen = seq_;
                L = job_;
                if (index >= job_slots_) continue;
            }
            work(*L, S);
            std::lock_guard<std::mutex> g(mu_);
            if (--busy_ == 0) done_cv_.notify_one();
        }
    }

    static void work(Launch &L, Slot &S) {
        t_launch = &L;
        S.rng = L.opt.seed * 0x100000001b3ull + reinterpret_cast<uintptr_t>(&S);
        try {
            prepare_slot(S, L);
            for (;;) {
                const uint64_t i = L.next.fetch_add(1, std::memory_order_relaxed);
                if (i >= L.n_blocks || L.aborted.load(std::memory_order_relaxed)) break;
                reset_block(L, S, L.order.empty() ? i : L.order[i]);
                run_block(L, S);
                check_front_canary(L, S);
            }
        } catch (const std::exception &e) {
            record(L, FAULT_INTERNAL, std::string("simulator engine: ") + e.what(), 0, -1);
        }
        t_launch = nullptr;
    }

    void grow(unsigned n) {
        while (slots_.size() < n) {
            auto s = std::make_unique<Slot>();
            Slot *raw = s.get();
            slots_.push_back(std::move(s));
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstacksize(&attr, 1 << 20);
            auto *arg = new std::pair<Pool *, unsigned>(this, static_cast<unsigned>(slots_.size() - 1));
            if (pthread_create(&raw->thread, &attr, &Pool::thread_main, arg) != 0) {
                delete arg;
                pthread_attr_destroy(&attr);
                slots_.pop_back();
                throw std::runtime_error("simulator: cannot start a slot thread");
            }
            pthread_attr_destroy(&attr);
        }
    }

    std::vector<std::unique_ptr<Slot>> slots_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    Launch *job_ = nullptr;
    unsigned job_slots_ = 0;
    unsigned busy_ = 0;
    uint64_t seq_ = 0;
    bool stop_ = false;
};

thread_local std::unique_ptr<Pool> t_pool;

} // namespace

// ------------------------------------------------------------------- hooks of sim_shim.h

[[noreturn]] void raise_fault(FaultKind kind, const std::string &message) {
    Launch *L = t_launch;
    self().in_kernel = false;
    if (L) record(*L, kind, message, 0, -1);
    siglongjmp(*self().unwind, 1);
}

[[noreturn]] void unwind_aborted() {
    self().in_kernel = false;
    siglongjmp(*self().unwind, 1);
}

bool launch_aborted() { return t_launch && t_launch->aborted.load(std::memory_order_relaxed); }

PTSIM_NO_TSAN void yield_fiber() {
    Slot &S = *t_slot;
    Fiber &f = *S.current;
    const bool was_in_kernel = f.ts.in_kernel;
#ifdef PTSIM_TSAN
    __tsan_switch_to_fiber(S.sched_tsan, 1);
#endif
    ptsim_switch_context(&f.sp, S.sched_sp);
    f.ts.in_kernel = was_in_kernel;
}

PTSIM_NO_TSAN void jitter() {
    Launch *L = t_launch;
    if (!L || L->opt.jitter == 0) return;
    Slot &S = *t_slot;
    if (splitmix(S.rng) % 1000 >= L->opt.jitter) return;
    ++S.jitter_yields;
    yield_fiber();
}

bool hazards_enabled() { return t_launch && t_launch->opt.hazards != 0; }

bool barrier_skipped(const Site &s) { return g_skip_barrier.active && site_matches(g_skip_barrier, s); }

int wait_group_delta(const Site &s) { return site_matches(g_wait_group, s) ? g_wait_group.delta : 0; }

std::string short_file(const char *file) {
    std::string f = file ? file : "?";
    const size_t k = f.rfind("kernels/");
    if (k != std::string::npos) f = f.substr(k);
    return f;
}

std::string where(const Site &s) { return short_file(s.file_name()) + ":" + std::to_string(s.line()); }

std::string thread_name(int tid) {
    if (tid < 0) return "thread ?";
    const Launch *L = t_launch;
    if (!L) return "thread " + std::to_string(tid);
    const Dim3 t = decompose(static_cast<uint64_t>(tid), L->block);
    return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ") [warp " +
           std::to_string(tid / 32) + " lane " + std::to_string(tid % 32) + "]";
}

} // namespace ptsim

// ------------------------------------------------------------------- C interface

extern "C" int ptsim_run(const ptsim_launch *launch, ptsim_fault *fault) {
    using namespace ptsim;
    std::memset(fault, 0, sizeof *fault);
    install_signal_handlers();
    try {
        Launch L;
        L.kernel = launch->kernel;
        L.grid = {launch->grid[0], launch->grid[1], launch->grid[2]};
        L.block = {launch->block[0], launch->block[1], launch->block[2]};
        L.smem = launch->smem_bytes;
        L.threads = launch->block[0] * launch->block[1] * launch->block[2];
        L.n_blocks = static_cast<uint64_t>(L.grid.x) * L.grid.y * L.grid.z;
        L.args = launch->args;
        L.opt = launch->options;
        L.fault = fault;
        if (L.threads == 0 || L.n_blocks == 0) return 0;
        if (L.smem > kMaxSmem) {
            std::snprintf(fault->message, sizeof fault->message, "engine: %zu bytes of shared memory exceed %zu", L.smem,
                          kMaxSmem);
            fault->kind = FAULT_INTERNAL;
            return FAULT_INTERNAL;
        }
        if (L.opt.shuffle) {
            L.order.resize(L.n_blocks);
            for (uint64_t i = 0; i < L.n_blocks; ++i) L.order[i] = i;
            uint64_t s = L.opt.seed ^ 0x5bd1e995ull;
            for (uint64_t i = L.n_blocks; i > 1; --i) std::swap(L.order[i - 1], L.order[splitmix(s) % i]);
        }
        unsigned slots = std::max(1u, L.opt.slots);
        if (slots > L.n_blocks) slots = static_cast<unsigned>(L.n_blocks);
        if (!t_pool) t_pool = std::make_unique<Pool>();
        t_pool->run(L, slots);
        return L.faulted ? fault->kind : 0;
    } catch (const std::exception &e) {
        std::snprintf(fault->message, sizeof fault->message, "simulator engine: %s", e.what());
        fault->kind = FAULT_INTERNAL;
        return FAULT_INTERNAL;
    }
}

extern "C" void ptsim_set_mutations(const char *skip_barrier, const char *wait_group) {
    std::lock_guard<std::mutex> g(ptsim::g_mutation_mu);
    ptsim::g_skip_barrier = ptsim::parse_mutation(skip_barrier, false);
    ptsim::g_wait_group = ptsim::parse_mutation(wait_group, true);
}

extern "C" unsigned long long ptsim_ldmatrix_bank_conflicts(void) {
    return pt::sim_detail::ldmatrix_bank_conflicts.load();
}
