/* The native kernels' threads: OpenMP, the same runtime (libgomp.so.1) as torch's CPU ops.
 *
 * A decode step alternates ~100 kernel calls with torch ops a few microseconds apart. A pool of our own
 * spun beside torch's OpenMP team, and on 2 cores the two teams' spinning threads took each other's cores
 * (measured: 60% of decode time in spin loops). Built with -fopenmp, this library binds to the libgomp that
 * torch has already loaded (same soname), so both use one team of threads. Built without OpenMP (a
 * compiler without it), every call runs on the calling thread.
 */
#include "native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int threads = 1;

/* Threads for later calls (the caller included); the spin argument is kept for the interface and unused
 * (OMP_WAIT_POLICY / GOMP_SPINCOUNT govern waiting). Returns the thread count in force. */
int pool_configure(int n_threads, int64_t spin_us) {
    (void)spin_us;
#ifdef _OPENMP
    threads = n_threads < 1 ? 1 : n_threads;
#else
    (void)n_threads;
    threads = 1;
#endif
    return threads;
}

int pool_threads(void) { return threads; }

void pool_run(pool_fn fn, void *ctx, int64_t n, int64_t grain) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t units = (n + grain - 1) / grain;
    int nt = threads < units ? threads : (int)units;
    if (nt <= 1) {
        fn(ctx, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        int64_t got = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (units + got - 1) / got * grain, begin = id * per, end = begin + per < n ? begin + per : n;
        if (begin < end) fn(ctx, begin, end);
    }
#else
    fn(ctx, 0, n);
#endif
}
