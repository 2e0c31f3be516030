// qkdctl profile: where the OTP workers' time goes, per syscall stage (bcc).
//
// Raw tracepoints (no tracefs needed, cheaper than perf tracepoints) on
// raw_syscalls:sys_enter/sys_exit and sched:sched_switch, attached from Python once
// the maps are filled (named on_* so that bcc does not autoload them). Only threads
// whose tgid is in `workers` (filled from Python) are recorded. The syscall number ->
// stage table is filled from Python too, so the C knows no architecture. No kernel
// struct is read: bcc's headers need not match the running kernel.
// NSTAGES and USER_STAGE come from cflags.
#include <uapi/linux/ptrace.h>

#define MAX_SYSCALL 512

// totals[] indices (per-CPU; Python sums them)
#define T_USER 0            // ns between a syscall's exit and the next one's entry
#define T_USER_CNT 1
#define T_OFF 2             // ns switched out
#define T_OFF_SYSCALL 3     // ... while inside a syscall
#define T_OFF_USER 4        // ... while outside one
#define T_OFF_RUNNABLE 5    // ... while runnable (preempted)
#define T_ON 6              // ns switched in
#define NTOTALS 7

struct hist_key {
    u32 stage;
    u32 slot;
};

struct start_t {
    u64 ts;
    u32 stage;
    u32 pad;
};

struct offcpu_t {
    u64 ts;
    u32 where;              // 0 unknown, 1 in a syscall, 2 in user space
    u32 runnable;
};

struct cpu_t {
    u64 on_ns;
    u64 off_ns;
};

BPF_HASH(workers, u32, u8, 1024);
BPF_ARRAY(stage_of, u32, MAX_SYSCALL);
BPF_HASH(start, u32, struct start_t, 16384);
BPF_HASH(lastexit, u32, u64, 16384);
BPF_HASH(offstart, u32, struct offcpu_t, 16384);
BPF_HASH(onstart, u32, u64, 16384);
BPF_HASH(cpu_time, u32, struct cpu_t, 1024);
BPF_HISTOGRAM(hist, struct hist_key, 1024);
BPF_PERCPU_ARRAY(stage_ns, u64, NSTAGES);
BPF_PERCPU_ARRAY(stage_cnt, u64, NSTAGES);
BPF_PERCPU_ARRAY(totals, u64, NTOTALS);
BPF_PERCPU_ARRAY(switched_at, u64, 1);  // last context switch on this CPU

static __always_inline void add_total(u32 idx, u64 v) {
    u64 *p = totals.lookup(&idx);
    if (p)
        *p += v;
}

static __always_inline void add_cpu(u32 tgid, u32 idx, u64 d) {
    add_total(idx, d);
    struct cpu_t zero = {};
    struct cpu_t *c = cpu_time.lookup_or_try_init(&tgid, &zero);
    if (!c)
        return;
    if (idx == T_ON)
        __sync_fetch_and_add(&c->on_ns, d);
    else
        __sync_fetch_and_add(&c->off_ns, d);
}

// A worker thread is running: if it was switched out, it came back at the last context
// switch of this CPU (any later switch here would have switched it out again). This is how
// switch-ins are timed without reading `next` in sched_switch.
static __always_inline void settle(u32 tid, u32 tgid) {
    u32 zero = 0;
    u64 *sw = switched_at.lookup(&zero);
    if (!sw || *sw == 0)
        return;
    u64 in = *sw;
    struct offcpu_t *o = offstart.lookup(&tid);
    if (o) {
        if (in > o->ts) {
            u64 d = in - o->ts;
            add_cpu(tgid, T_OFF, d);
            if (o->where == 1)
                add_total(T_OFF_SYSCALL, d);
            else if (o->where == 2)
                add_total(T_OFF_USER, d);
            if (o->runnable)
                add_total(T_OFF_RUNNABLE, d);
        }
        offstart.delete(&tid);
        onstart.update(&tid, &in);
    } else if (!onstart.lookup(&tid)) {
        onstart.update(&tid, &in);
    }
}

static __always_inline void add_hist(u32 stage, u64 delta_ns) {
    struct hist_key k = {};
    k.stage = stage;
    k.slot = bpf_log2l(delta_ns / 1000);
    hist.atomic_increment(k);
}

/* The calling thread's id when it belongs to a profiled worker (its pending on-CPU
 * accounting settled first), else 0. */
static __always_inline u32 worker_thread(void) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!workers.lookup(&tgid))
        return 0;
    settle(tid, tgid);
    return tid;
}

int on_sys_enter(struct bpf_raw_tracepoint_args *ctx) {
    u32 tid = worker_thread();
    if (!tid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 *le = lastexit.lookup(&tid);
    if (le && now > *le) {
        u64 gap = now - *le;
        add_total(T_USER, gap);
        add_total(T_USER_CNT, 1);
        add_hist(USER_STAGE, gap);
    }
    long nr = (long)ctx->args[1];
    struct start_t s = {};
    s.ts = now;
    s.stage = 0;  // other_syscalls
    if (nr >= 0 && nr < MAX_SYSCALL) {
        u32 key = nr;
        u32 *st = stage_of.lookup(&key);
        if (st && *st < NSTAGES)
            s.stage = *st;
    }
    start.update(&tid, &s);
    return 0;
}

int on_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    u32 tid = worker_thread();
    if (!tid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    lastexit.update(&tid, &now);
    struct start_t *s = start.lookup(&tid);
    if (!s)
        return 0;  // entered before we attached
    u64 delta = now - s->ts;
    u32 stage = s->stage;
    start.delete(&tid);
    if (stage >= NSTAGES)
        return 0;
    u64 *ns = stage_ns.lookup(&stage);
    if (ns)
        *ns += delta;
    u64 *cnt = stage_cnt.lookup(&stage);
    if (cnt)
        *cnt += 1;
    add_hist(stage, delta);
    return 0;
}

// TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
//          unsigned int prev_state): prev is the current task. `next` is never read: the
// kernel headers bcc compiles with need not match the running kernel's task_struct.
int on_sched_switch(struct bpf_raw_tracepoint_args *ctx) {
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (workers.lookup(&tgid)) {
        settle(tid, tgid);  // before switched_at moves: it holds our switch-in time
        u64 *on = onstart.lookup(&tid);
        if (on && now > *on)
            add_cpu(tgid, T_ON, now - *on);
        onstart.delete(&tid);
        struct offcpu_t o = {};
        o.ts = now;
        o.where = start.lookup(&tid) ? 1 : (lastexit.lookup(&tid) ? 2 : 0);
        o.runnable = (u32)ctx->args[3] == 0;
        offstart.update(&tid, &o);
    }
    u32 zero = 0;
    switched_at.update(&zero, &now);
    return 0;
}
