/* kvrelay native host library: a small persistent worker pool (the caller is worker 0).
 *
 * A job is cut into pieces; the caller and the workers claim pieces with an atomic counter, so a worker
 * that the OS has descheduled (2 busy cores) does not hold the caller up: the caller simply takes the
 * remaining pieces.  A worker joins a job only while holding `mu` and while the job is posted; the
 * caller waits (under `mu`) until no worker is inside the job, then withdraws it, so no worker ever sees
 * a job after its caller has returned.  Must not touch: what a piece does.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

typedef struct { pool_fn fn; void *ctx; int64_t num_pieces; int caller_cpu; } job_t;

static pthread_mutex_t submit_mu = PTHREAD_MUTEX_INITIALIZER; /* one pooled job at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_work = PTHREAD_COND_INITIALIZER, cv_idle = PTHREAD_COND_INITIALIZER;
static int want_threads = 2, pool_threads = 0, shutting_down = 0, atfork_done = 0;
static pthread_t *workers = NULL;
static const job_t *cur_job = NULL;   /* the posted job, NULL when none (guarded by mu) */
static int active = 0;                /* workers inside cur_job (changed under mu; read unlocked as a hint) */
static int64_t next_piece = 0;        /* claimed with __atomic_fetch_add */
static int last_caller_cpu = -1;      /* the core of the last job's caller (guarded by mu) */
static uint64_t generation = 0, pool_start_gen = 0; /* workers start from pool_start_gen */
static int64_t parallel_threshold = 1 << 20;
/* Back-off: a worker preempted in the middle of a piece makes the caller wait for a whole scheduler
 * time slice (milliseconds, on busy cores).  When the caller waited longer than a quarter of its own
 * work, jobs run on the caller alone until backoff_until (monotonic ns). */
static int64_t backoff_ns = 50 * 1000 * 1000LL;
static int64_t backoff_until = 0;
static uint64_t backoffs = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void claim_pieces(const job_t *j) {
    for (;;) {
        int64_t p = __atomic_fetch_add(&next_piece, 1, __ATOMIC_RELAXED);
        if (p >= j->num_pieces) return;
        j->fn(j->ctx, p);
    }
}

/* Keep a worker off its caller's core.  Woken by a caller whose other cores sit idle, Linux tends to run
 * the worker on the caller's own core (wake-affine), where the two take turns and a two-thread copy runs
 * slower than the caller alone (measured: 4 MiB copy+hash, bursts after 0.2 s idle, 10 GB/s; worker kept
 * off the caller's core, 20 GB/s).  A worker that finds itself on its caller's core narrows its affinity to
 * the process's other cores (moving at once); when a later caller runs elsewhere it takes the whole set
 * back.  Only when the process may run on more than one core. */
typedef struct { cpu_set_t all; int excluded; int usable; } affinity_t;

static void affinity_init(affinity_t *a) {
    a->excluded = -1;
    a->usable = sched_getaffinity(0, sizeof(a->all), &a->all) == 0 && CPU_COUNT(&a->all) > 1;
}

static void keep_off_caller(affinity_t *a, int caller_cpu) {
    if (!a->usable || caller_cpu < 0) return;
    if (a->excluded >= 0 && a->excluded != caller_cpu) { /* the caller moved: take the whole set back */
        if (sched_setaffinity(0, sizeof(a->all), &a->all) == 0) a->excluded = -1;
    }
    /* not only when nothing is excluded yet: a worker put back on the caller's core from outside (a
     * cgroup or taskset change) still finds itself there, and must move again */
    if (sched_getcpu() == caller_cpu && CPU_ISSET(caller_cpu, &a->all)) {
        cpu_set_t rest = a->all;
        CPU_CLR(caller_cpu, &rest);
        if (sched_setaffinity(0, sizeof(rest), &rest) == 0) a->excluded = caller_cpu;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

static void *worker_main(void *arg) {
    (void)arg;
    affinity_t aff;
    affinity_init(&aff);
    pthread_mutex_lock(&mu);
    uint64_t seen = pool_start_gen; /* not `generation`: a job may already have been posted */
    for (;;) {
        while (generation == seen && !shutting_down) pthread_cond_wait(&cv_work, &mu);
        if (shutting_down) break;
        seen = generation;
        const job_t *j = cur_job;
        if (!j) { /* woke after the job was withdrawn: its caller did the work, maybe because this worker
                   * shared its core and never got a turn, so keep off that core for the next job */
            int c = last_caller_cpu;
            pthread_mutex_unlock(&mu);
            keep_off_caller(&aff, c);
            pthread_mutex_lock(&mu);
            continue;
        }
        __atomic_add_fetch(&active, 1, __ATOMIC_RELAXED);
        int caller_cpu = j->caller_cpu;
        pthread_mutex_unlock(&mu);
        keep_off_caller(&aff, caller_cpu);
        claim_pieces(j);
        pthread_mutex_lock(&mu);
        if (__atomic_sub_fetch(&active, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&cv_idle);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* fork(): the child has no workers; hold the locks across fork and reset the pool in the child. */
static void atfork_prepare(void) { pthread_mutex_lock(&submit_mu); pthread_mutex_lock(&mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&mu); pthread_mutex_unlock(&submit_mu); }
static void atfork_child(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&submit_mu, NULL);
    pthread_cond_init(&cv_work, NULL);
    pthread_cond_init(&cv_idle, NULL);
    free(workers);
    workers = NULL;
    pool_threads = 0;
    shutting_down = 0;
    active = 0;
    cur_job = NULL;
}

static void pool_stop_locked(void) { /* submit_mu held */
    if (!pool_threads) return;
    pthread_mutex_lock(&mu);
    shutting_down = 1;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < pool_threads - 1; i++) pthread_join(workers[i], NULL);
    free(workers);
    workers = NULL;
    pool_threads = 0;
    shutting_down = 0;
}

static int pool_start_locked(void) { /* submit_mu held */
    if (!atfork_done) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); atfork_done = 1; }
    int n = want_threads;
    pool_start_gen = generation;
    workers = calloc((size_t)(n > 1 ? n - 1 : 1), sizeof(pthread_t));
    if (!workers) return -1;
    int started = 0;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&workers[i - 1], NULL, worker_main, NULL) != 0) break;
        started++;
    }
    pool_threads = started + 1;
    return 0;
}

static void run_inline(pool_fn fn, void *ctx, int64_t num_pieces) {
    for (int64_t p = 0; p < num_pieces; p++) fn(ctx, p);
}

int pool_threads_for(int64_t num_pieces) {
    int n = want_threads;
    return num_pieces < n ? (int)(num_pieces < 1 ? 1 : num_pieces) : n;
}

void pool_run(pool_fn fn, void *ctx, int64_t num_pieces, int64_t bytes) {
    if (want_threads <= 1 || num_pieces < 2 || bytes < parallel_threshold ||
        now_ns() < __atomic_load_n(&backoff_until, __ATOMIC_RELAXED) || pthread_mutex_trylock(&submit_mu) != 0) {
        run_inline(fn, ctx, num_pieces);
        return;
    }
    if (pool_threads != want_threads) {
        pool_stop_locked();
        if (pool_start_locked() != 0 || pool_threads == 1) {
            pthread_mutex_unlock(&submit_mu);
            run_inline(fn, ctx, num_pieces);
            return;
        }
    }
    job_t j = {fn, ctx, num_pieces, sched_getcpu()};
    pthread_mutex_lock(&mu);
    __atomic_store_n(&next_piece, 0, __ATOMIC_RELAXED);
    cur_job = &j;
    last_caller_cpu = j.caller_cpu;
    generation++;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    int64_t t0 = now_ns();
    claim_pieces(&j);
    int64_t t1 = now_ns();
    /* the last worker usually finishes within microseconds of the caller: poll for it briefly rather than
     * sleep, since a caller that sleeps is woken by the worker onto the worker's core (see keep_off_caller) */
    for (int i = 0; __atomic_load_n(&active, __ATOMIC_ACQUIRE) > 0; i++) {
        cpu_relax();
        if ((i & 63) == 63 && now_ns() - t1 > 200000) break;
    }
    pthread_mutex_lock(&mu);
    while (active > 0) pthread_cond_wait(&cv_idle, &mu);
    cur_job = NULL;
    pthread_mutex_unlock(&mu);
    int64_t t2 = now_ns();
    if (backoff_ns > 0 && t2 - t1 > (t1 - t0) / 4 + 200000) { /* waited > 1/4 of own work (+0.2 ms) */
        __atomic_store_n(&backoff_until, t2 + backoff_ns, __ATOMIC_RELAXED);
        backoffs++;
    }
    pthread_mutex_unlock(&submit_mu);
}

int kv_set_threads(int n) {
    if (n < 1) return -1;
    pthread_mutex_lock(&submit_mu);
    want_threads = n;
    if (pool_threads && pool_threads != n) pool_stop_locked();
    pthread_mutex_unlock(&submit_mu);
    return 0;
}

int kv_get_threads(void) { return want_threads; }
void kv_set_parallel_threshold(int64_t nbytes) { parallel_threshold = nbytes < 0 ? 0 : nbytes; }
int64_t kv_get_parallel_threshold(void) { return parallel_threshold; }
uint64_t kv_get_backoffs(void) { return backoffs; }
void kv_set_backoff_ns(int64_t ns) {
    backoff_ns = ns < 0 ? 0 : ns;
    __atomic_store_n(&backoff_until, 0, __ATOMIC_RELAXED);
}
