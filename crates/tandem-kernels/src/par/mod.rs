//! A persistent compute pool for the kernels' parallel loops.
//!
//! A decode step runs ~300 short parallel loops (a few microseconds each). Waking sleeping
//! threads for each one costs more than the loop, so the pool's workers spin on an epoch
//! counter between jobs and only park after [`SPIN_LIMIT`] of idleness (between requests).
//! The thread that starts a job runs tasks too and returns when every worker has checked out,
//! so the job's closure may borrow from the caller's stack.
//!
//! Kernels call [`for_each_task`], which uses the pool installed on the calling thread by
//! [`ThreadPool::install`] and runs the tasks inline when there is none (or when called from
//! inside a task); the matmuls and attention call [`for_each_range`] (each thread walks its
//! own share of the weight tiles or the works), and the model says with [`read_ahead`] (or
//! [`read_ahead_next`]) which weights come next, which threads with nothing to do bring into
//! their caches.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod ahead;
mod range;

use ahead::AheadReader;
pub(crate) use ahead::{read_ahead, read_ahead_next, Ahead};
pub(crate) use range::for_each_range;

/// How long an idle worker spins before it parks.
const SPIN_LIMIT: Duration = Duration::from_millis(2);

/// A job: `f(task)` for every task index below `tasks`.
#[derive(Clone, Copy)]
struct Job {
    /// The caller's closure with its lifetime erased; valid until every worker checked out.
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped (after `job` is set) to start a job.
    epoch: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Next task index to claim.
    next: AtomicUsize,
    /// Workers that have finished the current job.
    done: AtomicUsize,
    /// Workers parked (or about to park) waiting for a job.
    parked: AtomicUsize,
    /// A task of the current job panicked on a worker.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// What idle threads read ahead (see [`read_ahead`]), and a count bumped on each change.
    ahead: Mutex<Ahead>,
    ahead_gen: AtomicU64,
    /// What they read ahead once the next job has started (see [`read_ahead_next`]).
    ahead_next: Mutex<Option<Ahead>>,
    has_ahead_next: AtomicBool,
    /// Threads in the pool, the caller included.
    threads: usize,
    /// More threads than cores: waiting threads yield their core instead of spinning on it
    /// (a spinning thread would hold the core a working one needs).
    oversubscribed: bool,
}

impl Shared {
    /// One step of a busy wait.
    #[inline]
    fn wait_step(&self, spins: u32) {
        if self.oversubscribed || spins.is_multiple_of(1 << 12) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

// SAFETY: the job pointer is only dereferenced while the caller that owns the closure waits in
// `ThreadPool::run`; the closure is `Sync`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// A fixed set of compute threads (the calling thread counts as one of them).
pub struct ThreadPool {
    /// The core the calling thread is pinned to when the pool is installed (pinned pools).
    caller_core: Option<usize>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes jobs from different calling threads.
    busy: Mutex<()>,
}

thread_local! {
    /// The pool installed on this thread, and whether the thread is inside a task.
    static CURRENT: Cell<Option<*const ThreadPool>> = const { Cell::new(None) };
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// This thread's index in its pool (0: the calling thread; workers count from 1).
    static INDEX: Cell<usize> = const { Cell::new(0) };
    /// The core this thread was pinned to by a pool.
    static PINNED: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Compute threads of a default pool: `TANDEM_THREADS`, or one per core this process may use.
pub fn default_threads() -> usize {
    std::env::var("TANDEM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The cores this process may run on, ordered by NUMA node (then id), so that consecutive
/// runs of them share a node where the machine has several.
pub fn allowed_cores() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc == 0 {
            let mut cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: the index is below CPU_SETSIZE.
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect();
            let node_of = numa_nodes();
            cores.sort_by_key(|c| (node_of.get(c).copied().unwrap_or(0), *c));
            return cores;
        }
    }
    (0..n).collect()
}

/// Core id to NUMA node, from sysfs (empty where there is none).
fn numa_nodes() -> std::collections::HashMap<usize, usize> {
    let mut map = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
        return map;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(node) = name.strip_prefix("node").and_then(|n| n.parse().ok()) else {
            continue;
        };
        let list = std::fs::read_to_string(e.path().join("cpulist")).unwrap_or_default();
        for part in list.trim().split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                for c in a..=b {
                    map.insert(c, node);
                }
            }
        }
    }
    map
}

/// Pins the calling thread to `core` for good (Linux; elsewhere a no-op that succeeds).
pub fn pin_current_thread(core: usize) -> std::io::Result<()> {
    set_affinity(&core_set(core))?;
    PINNED.with(|p| p.set(Some(core)));
    Ok(())
}

/// The set of cores a thread may run on (Linux; elsewhere nothing).
#[cfg(target_os = "linux")]
type CoreSet = libc::cpu_set_t;
#[cfg(not(target_os = "linux"))]
type CoreSet = ();

fn core_set(core: usize) -> CoreSet {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET bounds-checks the index.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            set
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = core;
}

fn set_affinity(set: &CoreSet) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a valid cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<CoreSet>(), set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = set;
    Ok(())
}

fn get_affinity() -> std::io::Result<CoreSet> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<CoreSet>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(())
}

/// The calling thread pinned to a pinned pool's first core for one [`ThreadPool::install`],
/// its own affinity restored on drop: pinned for good, threads it spawned afterwards would
/// inherit that one core (a bandwidth probe's readers, spawned by the thread that had run the
/// model, all read from core 0 at half the machine's bandwidth).
struct CallerPin {
    saved: CoreSet,
    was: Option<usize>,
}

impl CallerPin {
    /// `None` where the thread already keeps to `core` (pinned for good, or in an outer
    /// `install`) or where its affinity cannot be read or set.
    fn new(core: usize) -> Option<CallerPin> {
        let was = PINNED.with(|p| p.get());
        if was == Some(core) {
            return None;
        }
        static WARNED: AtomicBool = AtomicBool::new(false);
        let pinned = get_affinity().and_then(|saved| set_affinity(&core_set(core)).map(|_| saved));
        match pinned {
            Ok(saved) => {
                PINNED.with(|p| p.set(Some(core)));
                Some(CallerPin { saved, was })
            }
            Err(e) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot pin a compute caller to core {core}: {e}");
                }
                None
            }
        }
    }
}

impl Drop for CallerPin {
    fn drop(&mut self) {
        if let Err(e) = set_affinity(&self.saved) {
            tracing::warn!("cannot restore a compute caller's affinity: {e}");
        }
        PINNED.with(|p| p.set(self.was));
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (`threads - 1` are spawned).
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        ThreadPool::start(threads, None)
    }

    /// A pool of one thread per core in `cores`, each pinned to its core: the thread that
    /// installs the pool to `cores[0]` while it is installed, the spawned ones to the rest (a
    /// tensor-parallel rank keeps to its own cores, and on a multi-socket host its own
    /// memory).
    pub fn pinned(cores: &[usize]) -> std::io::Result<ThreadPool> {
        if cores.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a pinned pool needs at least one core",
            ));
        }
        ThreadPool::start(cores.len(), Some(cores))
    }

    fn start(threads: usize, cores: Option<&[usize]>) -> std::io::Result<ThreadPool> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ahead: Mutex::new(Ahead::default()),
            ahead_gen: AtomicU64::new(0),
            ahead_next: Mutex::new(None),
            has_ahead_next: AtomicBool::new(false),
            threads: threads.max(1),
            oversubscribed: threads
                > std::thread::available_parallelism().map_or(usize::MAX, |n| n.get()),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let core = cores.map(|c| c[i]);
            let spawned = std::thread::Builder::new()
                .name(format!("tandem-compute-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        if let Err(e) = pin_current_thread(c) {
                            tracing::warn!("cannot pin a compute thread to core {c}: {e}");
                        }
                    }
                    INDEX.with(|x| x.set(i));
                    worker(&s)
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    shutdown(&shared, &mut workers);
                    return Err(e);
                }
            }
        }
        Ok(ThreadPool {
            caller_core: cores.map(|c| c[0]),
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    /// A pool sized by `TANDEM_THREADS`, or one thread per available core.
    ///
    /// A pool with a thread for every core this process may use is [pinned](Self::pinned)
    /// to them. Unpinned, a worker woken after an idle spell is often placed on its waker's
    /// core, and the two spin there, sharing it, until the scheduler's balancing parts them:
    /// the first decode token after 300 ms idle took a median 14.5 ms (up to 22) instead of
    /// 3.4 on the reference model. A smaller pool stays unpinned: pinned, several of them in
    /// one process or in several would all crowd onto the first cores.
    pub fn with_default_threads() -> std::io::Result<ThreadPool> {
        let threads = default_threads();
        let cores = allowed_cores();
        if threads > 1 && threads == cores.len() {
            return ThreadPool::pinned(&cores);
        }
        ThreadPool::new(threads)
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f` with this pool as the one [`for_each_task`] uses on this thread.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<*const ThreadPool>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self as *const ThreadPool))));
        let _pin = self.caller_core.and_then(CallerPin::new);
        f()
    }

    /// Runs `f(0..tasks)` on all threads; returns when every task has run.
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) if !self.workers.is_empty() && tasks > 1 => g,
            // Another thread is using the pool, or there is nothing to share: run here.
            _ => return run_inline(tasks, f),
        };
        let s = &*self.shared;
        // SAFETY (lifetime erasure): we do not return before every worker checked out below.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job { f, tasks });
        s.next.store(0, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
        ahead::start_next(s);
        // SAFETY: `f` is alive for this whole call. A panic is held until the workers are out.
        let mine = catch_unwind(AssertUnwindSafe(|| claim_tasks(s, tasks, unsafe { &*f })));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.workers.len() {
            if ahead::CALLER_READER.with_borrow_mut(|r| r.step(s)) {
                continue;
            }
            spins = spins.wrapping_add(1);
            s.wait_step(spins);
        }
        drop(guard);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute task panicked on a pool thread");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        shutdown(&self.shared, &mut self.workers);
    }
}

fn shutdown(shared: &Shared, workers: &mut Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    shared.epoch.fetch_add(1, Ordering::SeqCst);
    for w in workers.iter() {
        w.thread().unpark();
    }
    for w in workers.drain(..) {
        let _ = w.join();
    }
}

/// Claims and runs tasks until none are left.
fn claim_tasks(s: &Shared, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_TASK.with(|t| t.set(false));
        }
    }
    IN_TASK.with(|t| t.set(true));
    let _leave = Leave;
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            break;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    // The epoch the pool was created with: a job started before this thread ran is still seen.
    let mut seen = 0;
    let mut reader = AheadReader::default();
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            if reader.step(s) {
                continue;
            }
            spins = spins.wrapping_add(1);
            s.wait_step(spins);
            if spins.is_multiple_of(1 << 10) && idle_since.elapsed() > SPIN_LIMIT {
                s.parked.fetch_add(1, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park_timeout(Duration::from_millis(100));
                }
                s.parked.fetch_sub(1, Ordering::SeqCst);
                idle_since = Instant::now();
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // SAFETY: the caller waits for our `done` below before its closure goes away.
            let ran = catch_unwind(AssertUnwindSafe(|| {
                claim_tasks(s, job.tasks, unsafe { &*job.f })
            }));
            if ran.is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

fn run_inline(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    (0..tasks).for_each(f);
}

/// Runs `f(i)` for every `i < tasks`, on the installed pool's threads when there is one.
pub(crate) fn for_each_task(tasks: usize, f: impl Fn(usize) + Sync) {
    let pool = CURRENT.with(|c| c.get());
    match pool {
        Some(p) if !IN_TASK.with(|t| t.get()) => {
            // SAFETY: `install` keeps the pool alive while it is current on this thread.
            unsafe { &*p }.run(tasks, &f)
        }
        _ => run_inline(tasks, &f),
    }
}

/// Threads of the installed pool (1 without one).
pub(crate) fn current_threads() -> usize {
    let pool = CURRENT.with(|c| c.get());
    // SAFETY: as in `for_each_task`.
    pool.map_or(1, |p| unsafe { &*p }.threads())
}

/// A raw pointer that may be shared across tasks which write disjoint elements.
pub(crate) struct SyncPtr<T>(pub *mut T);

impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}

// SAFETY: users only write disjoint index sets from different tasks (checked at each use).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// # Safety
    /// `i` must be in bounds of the original buffer and written by no other task concurrently.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: T) {
        *self.0.add(i) = v;
    }

    /// # Safety
    /// `start..start+len` must be in bounds and touched by no other task concurrently.
    #[inline(always)]
    pub unsafe fn slice_mut<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// How many output rows each parallel task takes: enough tasks to balance the pool, each a
/// multiple of `align` rows.
pub(crate) fn chunk_rows(n: usize, align: usize) -> usize {
    let tasks = current_threads() * 4;
    let per = n.div_ceil(tasks.max(1)).max(align);
    per.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_and_nested_loops_run_inline() {
        let pool = ThreadPool::new(3).unwrap();
        for tasks in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.install(|| {
                for_each_task(tasks, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    for_each_task(2, |_| {
                        hits[i].fetch_add(10, Ordering::Relaxed);
                    });
                })
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 21));
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_still_works() {
        let pool = ThreadPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| for_each_task(8, |i| assert!(i != 5, "task 5")))
        }));
        assert!(r.is_err());
        let n = AtomicU32::new(0);
        pool.install(|| {
            for_each_task(8, |_| {
                n.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = ThreadPool::new(2).unwrap();
        std::thread::sleep(SPIN_LIMIT * 3);
        let n = AtomicU32::new(0);
        pool.install(|| {
            for_each_task(64, |_| {
                n.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_pool_runs_each_thread_on_its_core_after_an_idle_spell() {
        let cores = allowed_cores();
        let pool = ThreadPool::pinned(&cores).unwrap();
        for _ in 0..3 {
            // Long enough for the workers to park: their wake-up must not move them.
            std::thread::sleep(SPIN_LIMIT * 3);
            let seen: Vec<Mutex<Vec<i32>>> = cores.iter().map(|_| Mutex::new(vec![])).collect();
            pool.install(|| {
                for_each_task(64, |_| {
                    // SAFETY: sched_getcpu has no preconditions.
                    let cpu = unsafe { libc::sched_getcpu() };
                    seen[INDEX.with(|i| i.get())].lock().unwrap().push(cpu);
                })
            });
            for (core, cpus) in cores.iter().zip(&seen) {
                assert!(cpus.lock().unwrap().iter().all(|&c| c as usize == *core));
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_caller_keeps_to_the_first_core_only_while_the_pool_is_installed() {
        let cores = allowed_cores();
        let before = get_affinity().unwrap();
        let pool = ThreadPool::pinned(&cores).unwrap();
        let inside = pool.install(|| {
            let nested = pool.install(get_affinity).unwrap();
            (get_affinity().unwrap(), nested)
        });
        let only_first = core_set(cores[0]);
        // SAFETY: CPU_EQUAL compares two valid sets.
        let same = |a: &CoreSet, b: &CoreSet| unsafe { libc::CPU_EQUAL(a, b) };
        assert!(same(&inside.0, &only_first) && same(&inside.1, &only_first));
        assert!(same(&get_affinity().unwrap(), &before));
        assert_eq!(PINNED.with(|p| p.get()), None);
    }

    #[test]
    fn concurrent_callers_share_one_pool() {
        let pool = Arc::new(ThreadPool::new(2).unwrap());
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let n = AtomicU32::new(0);
                    for _ in 0..200 {
                        p.install(|| {
                            for_each_task(16, |_| {
                                n.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                    n.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200 * 16);
        }
    }
}
