//! A persistent pool of worker threads with a cheap fork-join: a decode step runs a few hundred small parallel
//! ops, so waking threads must cost far less than an op. Workers spin briefly on a generation counter between
//! jobs (the next op usually comes within microseconds) and sleep on a condition variable after that.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    threads: usize,
    /// The current job, valid while `pending > 0`.
    job: Mutex<Option<&'static Job>>,
    generation: AtomicUsize,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// Spins before a worker sleeps: long enough to span the gap between two ops of a step.
const SPINS: usize = 1 << 16;

impl Pool {
    /// A pool running jobs on `threads` threads: the caller's and `threads - 1` workers.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            threads,
            job: Mutex::new(None),
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{index}"))
                    .spawn(move || worker(&shared, index))
                    .expect("spawn a worker thread")
            })
            .collect();
        Pool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `job(i)` for every thread index `i` in `0..threads`, the caller taking index 0, and returns when all
    /// are done.
    pub fn run<'a>(&self, job: &'a (dyn Fn(usize) + Sync + 'a)) {
        let s = &*self.shared;
        if s.threads == 1 {
            job(0);
            return;
        }
        // SAFETY: the reference is dropped from `s.job` before this function returns, after every worker is done.
        let job_static: &'static Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Job>(job) };
        *s.job.lock().expect("job lock") = Some(job_static);
        s.pending.store(s.threads - 1, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _guard = s.lock.lock().expect("pool lock");
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        while s.pending.load(Acquire) != 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().expect("job lock") = None;
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a kiln worker thread panicked");
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0;
        loop {
            let generation = s.generation.load(Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if s.stop.load(Acquire) {
                return;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            s.sleepers.fetch_add(1, SeqCst);
            let guard = s.lock.lock().expect("pool lock");
            if s.generation.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                drop(s.wake.wait(guard).expect("pool lock"));
            }
            s.sleepers.fetch_sub(1, SeqCst);
            spins = 0;
        }
        let job = s
            .job
            .lock()
            .expect("job lock")
            .expect("a job is set while pending");
        if catch_unwind(AssertUnwindSafe(|| job(index))).is_err() {
            s.panicked.store(true, SeqCst);
        }
        s.pending.fetch_sub(1, Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _guard = self.shared.lock.lock().expect("pool lock");
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Pool {
    /// Runs `work(begin, end)` over `0..n` cut into `per_thread` pieces per thread of whole `align` units (the last
    /// piece runs to `n`), each thread taking the next piece when it finishes one. A static split waits for its
    /// slowest thread, and on a shared machine one core is often slower than the other for the length of an op.
    pub fn run_pieces(
        &self,
        n: usize,
        align: usize,
        per_thread: usize,
        work: &(dyn Fn(usize, usize) + Sync),
    ) {
        let units = n / align;
        let pieces = units.min(self.threads() * per_thread).max(1);
        if self.threads() == 1 || pieces == 1 {
            work(0, n);
            return;
        }
        let claims = Claims::new(pieces);
        self.run(&|_| {
            for piece in &claims {
                let (begin, end) = split(n, align, piece, pieces);
                work(begin, end);
            }
        });
    }
}

/// The indices `0..count`, each handed to whichever thread of a job asks next: shared by the job's threads, each
/// iterating `&claims`. A thread slowed down by another process on its core claims fewer.
pub struct Claims {
    next: AtomicUsize,
    count: usize,
}

impl Claims {
    pub fn new(count: usize) -> Self {
        Claims {
            next: AtomicUsize::new(0),
            count,
        }
    }
}

impl Iterator for &Claims {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let i = self.next.fetch_add(1, Relaxed);
        (i < self.count).then_some(i)
    }
}

/// The share of `0..n` (in units of `align`) that thread `i` of `threads` takes.
pub fn split(n: usize, align: usize, i: usize, threads: usize) -> (usize, usize) {
    let units = n / align;
    let (base, extra) = (units / threads, units % threads);
    let begin = i * base + i.min(extra);
    let end = begin + base + usize::from(i < extra);
    (
        begin * align,
        if i + 1 == threads { n } else { end * align },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = Pool::new(3);
        let hits = AtomicU64::new(0);
        for _ in 0..1000 {
            pool.run(&|i| {
                hits.fetch_add(1 << (16 * i), SeqCst);
            });
        }
        assert_eq!(hits.load(SeqCst), 1000 * (1 + (1 << 16) + (1 << 32)));
    }

    #[test]
    fn pieces_cover_the_range_once_in_aligned_pieces() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for (n, align, per_thread) in [
                (576, 4, 8),
                (49152, 4, 1),
                (8, 4, 8),
                (10, 1, 3),
                (4, 4, 8),
                (0, 4, 8),
                (6, 4, 2),
                (10, 4, 8),
                (1001, 4, 8),
            ] {
                let covered: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.run_pieces(n, align, per_thread, &|begin, end| {
                    assert!(begin % align == 0 && begin <= end && end <= n);
                    for c in &covered[begin..end] {
                        c.fetch_add(1, SeqCst);
                    }
                });
                assert!(
                    covered.iter().all(|c| c.load(SeqCst) == 1),
                    "{n} by {align}, {per_thread} per thread"
                );
            }
        }
    }

    #[test]
    fn split_covers_the_range_in_aligned_pieces() {
        for (n, align, threads) in [(576, 4, 2), (49152, 4, 3), (8, 4, 4), (10, 1, 3)] {
            let mut next = 0;
            for i in 0..threads {
                let (b, e) = split(n, align, i, threads);
                assert_eq!(b, next);
                assert!(b % align == 0 && b <= e);
                next = e;
            }
            assert_eq!(next, n);
        }
    }
}
