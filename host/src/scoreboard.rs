//! The scoreboard: a small table in memory shared by the master and its
//! workers, one slot per worker (Apache httpd's idea and name).
//!
//! A worker marks, in its slot, which plugin it is calling and counts its
//! calls; the master reads the slots. That answers two questions no other
//! channel can:
//!
//! - **Which plugin was running when a worker died?** The slot survives the
//!   worker (SIGSEGV, abort, SIGKILL), so the master can name the plugin.
//! - **Is a plugin call stuck?** If a slot shows a call in flight and its
//!   call counter has not moved for `plugin_timeout`, the call has hung: the
//!   master kills that worker (the uWSGI "harakiri" idea).
//!
//! It also holds each worker's statistics ([`Stats`]), which the master sums
//! for the admin endpoint's `/metrics`.
//!
//! Every field has a single writer (its worker), so counters are bumped with
//! a relaxed load and store — plain moves, no locked instruction, no syscall,
//! no lock. The hung-call watchdog reads no clock in the worker: the master
//! measures elapsed time by sampling the call counter.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

/// One worker's slot.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    /// Index + 1 of the plugin being called, 0 when no call is in flight.
    in_flight: AtomicU32,
    /// Plugin calls started since the worker began.
    calls: AtomicU64,
    /// How far the worker got in starting: [`BOOTING`], [`READY`] (plugins
    /// loaded, accepting: the master waits for it before draining the
    /// worker it replaces), or [`LOAD_FAILED`] + the index of the plugin
    /// that refused to load.
    ///
    /// This, not the worker's exit status, tells the master that a plugin
    /// failed to load: a plugin can call `exit(4)` at any time, but it has
    /// no reason to write here, and once a worker is `READY` the master
    /// treats any exit as a crash of that worker.
    boot: AtomicU32,
    /// Set by the worker when it wants to be replaced (it served
    /// `max_requests_per_worker`); it keeps serving until the master drains it.
    retire: AtomicU32,
    /// Per plugin (by config index): calls in flight on its pool threads
    /// (`threads = N`), which `in_flight` (the reactor thread's) does not
    /// see. The exception to "one writer per field": pool threads add and
    /// subtract with atomic read-modify-writes.
    pool_calls: [AtomicU32; MAX_PLUGINS],
    /// The worker's statistics.
    pub stats: Stats,
}

/// [`Slot`]'s `boot`: the worker is loading its plugins.
const BOOTING: u32 = 0;
/// [`Slot`]'s `boot`: the worker serves.
const READY: u32 = 1;
/// [`Slot`]'s `boot`: plugin `boot - LOAD_FAILED` refused to load.
const LOAD_FAILED: u32 = 2;

/// Plugins with statistics per worker; plugins past this many are served
/// but not counted.
pub const MAX_PLUGINS: usize = 16;
/// Upper bounds (µs) of the latency histogram's buckets; one more bucket
/// counts everything above the last.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The kinds of protocol error, in [`Stats::protocol_errors`] order: the
/// `kind` label of `nbnet_protocol_errors_total`.
pub const PROTOCOL_ERROR_KINDS: [&str; 4] = [
    // A header byte that is not an ASCII digit.
    "bad_header",
    // A header declaring a zero-length frame.
    "zero_length",
    // A header declaring more than max_frame_bytes.
    "too_long",
    // A missing or malformed PROXY protocol header.
    "proxy_header",
];
/// [`PROTOCOL_ERROR_KINDS`] index of a PROXY header error.
pub const PROTOCOL_ERROR_PROXY: usize = 3;

/// `read_timeout` closes, in [`Stats::read_timeouts`] order: the `state`
/// label of `nbnet_read_timeouts_total`.
pub const READ_TIMEOUT_STATES: [&str; 3] = ["idle", "mid_frame", "not_reading"];

/// A counter with one writer: bumped without a locked instruction.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only the owning worker calls this).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    /// Subtracts `n` (a gauge going down; only the owning worker calls this).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// One plugin's numbers in one worker.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Requests answered or failed.
    pub requests: Counter,
    /// Requests the plugin failed (panics included).
    pub errors: Counter,
    /// Of those, Rust panics caught by the SDK.
    pub panics: Counter,
    /// Sum of call durations, in nanoseconds.
    pub latency_ns: Counter,
    /// Call durations by bucket (see [`LATENCY_BOUNDS_US`]).
    pub buckets: [Counter; BUCKETS],
}

impl PluginStats {
    /// Records `n` requests answered (counted once per read, not per call).
    #[inline]
    pub fn record_answered(&self, n: u64) {
        if n > 0 {
            self.requests.add(n);
        }
    }

    /// Records one failed call (the request counts as handled).
    #[cold]
    pub fn record_failure(&self, outcome: Outcome) {
        self.requests.add(1);
        match outcome {
            Outcome::Error => self.errors.add(1),
            Outcome::Panic => {
                self.errors.add(1);
                self.panics.add(1);
            }
        }
    }

    /// Records how long one call took, answered or failed.
    pub fn record_latency(&self, elapsed: std::time::Duration) {
        self.record_latency_shared(elapsed, 1);
    }

    /// Records one call that handled `requests` requests (a batch): each
    /// is counted with an equal share of the call's time.
    pub fn record_latency_shared(&self, elapsed: std::time::Duration, requests: u64) {
        if requests == 0 {
            return;
        }
        let ns = elapsed.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.latency_ns.add(ns);
        let us = ns / requests / 1_000;
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us < bound)
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket].add(requests);
    }
}

/// How a failed plugin call failed, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It reported an error.
    Error,
    /// It panicked (caught by the Rust SDK).
    Panic,
}

/// One worker's numbers.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now (a gauge).
    pub connections_open: Counter,
    /// Connections accepted.
    pub connections_total: Counter,
    /// Request bytes received.
    pub bytes_in: Counter,
    /// Response bytes sent.
    pub bytes_out: Counter,
    /// Connections closed for breaking the framing protocol, by kind
    /// (see [`PROTOCOL_ERROR_KINDS`]).
    pub protocol_errors: [Counter; PROTOCOL_ERROR_KINDS.len()],
    /// Connections closed after `read_timeout` without progress: idle
    /// (between frames) and stalled mid-frame (see [`READ_TIMEOUT_STATES`]).
    pub read_timeouts: [Counter; READ_TIMEOUT_STATES.len()],
    /// Times the worker stopped accepting because it held
    /// `max_connections` (new clients then wait in the listen backlog).
    pub max_connections_reached: Counter,
    /// Connections closed because the worker's connections together held
    /// more than `max_buffered_bytes` (the ones holding the most).
    pub buffer_budget_closes: Counter,
    /// Connections this worker handed over to another (it was replaced).
    pub connections_handed_over: Counter,
    /// Connections another worker handed over to this one.
    pub connections_adopted: Counter,
    /// Connections closed at a frame boundary because a hand-over could not
    /// be made (no worker to take them, the taker full or stopping…).
    pub handover_failures: Counter,
    /// Clients refused by a listener's `allow`/`deny` lists.
    pub access_refused: Counter,
    /// Requests a plugin deferred (ABI 1.3).
    pub deferred: Counter,
    /// Deferred requests failed for `deferred_timeout` (connection closed).
    pub deferred_timeouts: Counter,
    /// Completions that arrived after their connection had closed (the
    /// client left, a deadline, an error): nothing sent.
    pub deferred_late: Counter,
    /// Completions refused: the handle was completed already.
    pub deferred_refused: Counter,
    /// TLS handshakes, failures by reason, hand-over closes (see
    /// [`crate::tls::counters`]).
    pub tls: [Counter; crate::tls::counters::COUNT],
    /// Per plugin (by config index).
    pub plugins: [PluginStats; MAX_PLUGINS],
}

impl Stats {
    /// The numbers of plugin `index`, if it is counted.
    #[inline]
    pub fn plugin(&self, index: usize) -> Option<&PluginStats> {
        self.plugins.get(index)
    }

    fn reset(&self) {
        for counter in [
            &self.connections_open,
            &self.connections_total,
            &self.bytes_in,
            &self.bytes_out,
            &self.max_connections_reached,
            &self.buffer_budget_closes,
            &self.connections_handed_over,
            &self.connections_adopted,
            &self.handover_failures,
            &self.access_refused,
            &self.deferred,
            &self.deferred_timeouts,
            &self.deferred_late,
            &self.deferred_refused,
        ]
        .into_iter()
        .chain(&self.protocol_errors)
        .chain(&self.read_timeouts)
        .chain(&self.tls)
        {
            counter.reset();
        }
        for plugin in &self.plugins {
            for counter in [
                &plugin.requests,
                &plugin.errors,
                &plugin.panics,
                &plugin.latency_ns,
            ] {
                counter.reset();
            }
            for bucket in &plugin.buckets {
                bucket.reset();
            }
        }
    }
}

/// Plain sums of [`Stats`], kept by the master (e.g. for workers that are
/// gone, so that totals never go backwards).
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Connections open (gauge: only meaningful for live workers).
    pub connections_open: u64,
    /// See [`Stats`].
    pub connections_total: u64,
    /// See [`Stats`].
    pub bytes_in: u64,
    /// See [`Stats`].
    pub bytes_out: u64,
    /// See [`Stats`].
    pub protocol_errors: [u64; PROTOCOL_ERROR_KINDS.len()],
    /// See [`Stats`].
    pub read_timeouts: [u64; READ_TIMEOUT_STATES.len()],
    /// See [`Stats`].
    pub max_connections_reached: u64,
    /// See [`Stats`].
    pub buffer_budget_closes: u64,
    /// See [`Stats`].
    pub connections_handed_over: u64,
    /// See [`Stats`].
    pub connections_adopted: u64,
    /// See [`Stats`], plus the master's own (nobody to forward to).
    pub handover_failures: u64,
    /// See [`Stats`].
    pub access_refused: u64,
    /// See [`Stats`].
    pub deferred: u64,
    /// See [`Stats`].
    pub deferred_timeouts: u64,
    /// See [`Stats`].
    pub deferred_late: u64,
    /// See [`Stats`].
    pub deferred_refused: u64,
    /// See [`Stats`].
    pub tls: [u64; crate::tls::counters::COUNT],
    /// Per plugin name: requests, errors, panics, latency sum (ns), buckets.
    pub plugins: std::collections::BTreeMap<String, PluginTotals>,
}

/// Plain sums of [`PluginStats`].
#[derive(Debug, Default, Clone)]
pub struct PluginTotals {
    /// See [`PluginStats`].
    pub requests: u64,
    /// See [`PluginStats`].
    pub errors: u64,
    /// See [`PluginStats`].
    pub panics: u64,
    /// See [`PluginStats`].
    pub latency_ns: u64,
    /// See [`PluginStats`].
    pub buckets: [u64; BUCKETS],
}

impl Totals {
    /// Adds a worker's numbers; `plugins` names its config's plugins.
    pub fn add(&mut self, stats: &Stats, plugins: &[String], include_gauges: bool) {
        if include_gauges {
            self.connections_open += stats.connections_open.get();
        }
        self.connections_total += stats.connections_total.get();
        self.bytes_in += stats.bytes_in.get();
        self.bytes_out += stats.bytes_out.get();
        for (total, counter) in self.protocol_errors.iter_mut().zip(&stats.protocol_errors) {
            *total += counter.get();
        }
        for (total, counter) in self.read_timeouts.iter_mut().zip(&stats.read_timeouts) {
            *total += counter.get();
        }
        self.max_connections_reached += stats.max_connections_reached.get();
        self.buffer_budget_closes += stats.buffer_budget_closes.get();
        self.connections_handed_over += stats.connections_handed_over.get();
        self.connections_adopted += stats.connections_adopted.get();
        self.handover_failures += stats.handover_failures.get();
        self.access_refused += stats.access_refused.get();
        self.deferred += stats.deferred.get();
        self.deferred_timeouts += stats.deferred_timeouts.get();
        self.deferred_late += stats.deferred_late.get();
        self.deferred_refused += stats.deferred_refused.get();
        for (total, counter) in self.tls.iter_mut().zip(&stats.tls) {
            *total += counter.get();
        }
        for (name, plugin) in plugins.iter().zip(&stats.plugins) {
            let sum = self.plugins.entry(name.clone()).or_default();
            sum.requests += plugin.requests.get();
            sum.errors += plugin.errors.get();
            sum.panics += plugin.panics.get();
            sum.latency_ns += plugin.latency_ns.get();
            for (total, bucket) in sum.buckets.iter_mut().zip(&plugin.buckets) {
                *total += bucket.get();
            }
        }
    }

    /// Adds another set of totals.
    pub fn merge(&mut self, other: &Totals) {
        self.connections_open += other.connections_open;
        self.connections_total += other.connections_total;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        for (total, n) in self.protocol_errors.iter_mut().zip(other.protocol_errors) {
            *total += n;
        }
        for (total, n) in self.read_timeouts.iter_mut().zip(other.read_timeouts) {
            *total += n;
        }
        self.max_connections_reached += other.max_connections_reached;
        self.buffer_budget_closes += other.buffer_budget_closes;
        self.connections_handed_over += other.connections_handed_over;
        self.connections_adopted += other.connections_adopted;
        self.handover_failures += other.handover_failures;
        self.access_refused += other.access_refused;
        self.deferred += other.deferred;
        self.deferred_timeouts += other.deferred_timeouts;
        self.deferred_late += other.deferred_late;
        self.deferred_refused += other.deferred_refused;
        for (total, n) in self.tls.iter_mut().zip(other.tls) {
            *total += n;
        }
        for (name, plugin) in &other.plugins {
            let sum = self.plugins.entry(name.clone()).or_default();
            sum.requests += plugin.requests;
            sum.errors += plugin.errors;
            sum.panics += plugin.panics;
            sum.latency_ns += plugin.latency_ns;
            for (total, bucket) in sum.buckets.iter_mut().zip(&plugin.buckets) {
                *total += bucket;
            }
        }
    }
}

impl Slot {
    /// Records that `plugin` (an index into the config's plugins) is about
    /// to be called.
    #[inline]
    pub fn enter(&self, plugin: usize) {
        // Single writer: a load and a store, no locked instruction.
        self.calls
            .store(self.calls.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.in_flight.store(plugin as u32 + 1, Ordering::Relaxed);
    }

    /// The call counter itself, for a plugin's `process_batch` to count
    /// each request of a batch as a call of its own (single writer: this
    /// worker's thread, inside the call).
    #[inline]
    pub fn progress_counter(&self) -> *mut u64 {
        self.calls.as_ptr()
    }

    /// Records that the call returned.
    #[inline]
    pub fn leave(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
    }

    /// Runs `call` marked as a call into `plugin`.
    #[inline]
    pub fn track<T>(&self, plugin: usize, call: impl FnOnce() -> T) -> T {
        self.enter(plugin);
        let result = call();
        self.leave();
        result
    }

    /// The plugin in flight (index into the config's plugins), if any.
    pub fn in_flight(&self) -> Option<usize> {
        match self.in_flight.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n as usize - 1),
        }
    }

    /// Records that a pool thread is about to call `plugin`'s instance.
    #[inline]
    pub fn pool_enter(&self, plugin: usize) {
        if let Some(count) = self.pool_calls.get(plugin) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that a pool thread's call into `plugin` returned.
    #[inline]
    pub fn pool_leave(&self, plugin: usize) {
        if let Some(count) = self.pool_calls.get(plugin) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The plugins (config indexes) with calls in flight on pool threads.
    pub fn pool_in_flight(&self) -> Vec<usize> {
        (0..MAX_PLUGINS)
            .filter(|&i| self.pool_calls[i].load(Ordering::Relaxed) > 0)
            .collect()
    }

    /// Calls started so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Clears the slot for a new worker.
    pub fn reset(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.boot.store(BOOTING, Ordering::Relaxed);
        self.retire.store(0, Ordering::Relaxed);
        for count in &self.pool_calls {
            count.store(0, Ordering::Relaxed);
        }
        self.stats.reset();
    }

    /// The worker is serving (plugins loaded, listeners registered).
    pub fn set_ready(&self) {
        self.boot.store(READY, Ordering::Release);
    }

    /// Whether the worker said it is serving.
    pub fn is_ready(&self) -> bool {
        self.boot.load(Ordering::Acquire) == READY
    }

    /// The worker could not load plugin `plugin` (it logged why) and is
    /// about to exit.
    pub fn set_load_failed(&self, plugin: usize) {
        let value = LOAD_FAILED.saturating_add(u32::try_from(plugin).unwrap_or(u32::MAX - 2));
        self.boot.store(value, Ordering::Release);
    }

    /// The plugin the worker said it could not load, if it said so.
    pub fn load_failed(&self) -> Option<usize> {
        match self.boot.load(Ordering::Acquire) {
            n if n >= LOAD_FAILED => Some((n - LOAD_FAILED) as usize),
            _ => None,
        }
    }

    /// The worker asks to be replaced.
    pub fn request_retirement(&self) {
        self.retire.store(1, Ordering::Release);
    }

    /// Whether the worker asked to be replaced.
    pub fn wants_retirement(&self) -> bool {
        self.retire.load(Ordering::Acquire) == 1
    }
}

/// The shared table. Created by the master before forking; the mapping is
/// inherited by every worker (`MAP_SHARED`), so writes are seen both ways.
pub struct Scoreboard {
    slots: NonNull<Slot>,
    len: usize,
}

// SAFETY: the slots are only accessed through atomics.
unsafe impl Send for Scoreboard {}
// SAFETY: as above.
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Maps a zeroed table of `len` slots shared with future children.
    pub fn new(len: usize) -> nix::Result<Scoreboard> {
        let bytes =
            NonZeroUsize::new(len.max(1) * std::mem::size_of::<Slot>()).expect("at least one slot");
        // SAFETY: a fresh anonymous mapping (zero-filled, so every slot is a
        // valid all-zero `Slot` of atomics); it is never unmapped while the
        // process runs, so references into it stay valid.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Scoreboard {
            slots: ptr.cast(),
            len: len.max(1),
        })
    }

    /// Slot `index` (a worker's index). `'static` because the mapping is
    /// never unmapped (there is no `Drop`): it lives as long as the process.
    pub fn slot(&self, index: usize) -> &'static Slot {
        assert!(index < self.len, "scoreboard slot {index} out of range");
        // SAFETY: in bounds of a mapping that is never unmapped; `Slot` is
        // atomics only, so shared access from any process is sound.
        unsafe { &*self.slots.as_ptr().add(index) }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no slots (never: it has at least one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_records_the_call_in_flight_and_counts_calls() {
        let board = Scoreboard::new(2).unwrap();
        let slot = board.slot(1);
        assert_eq!(slot.in_flight(), None);
        let seen = slot.track(3, || slot.in_flight());
        assert_eq!(seen, Some(3));
        assert_eq!(slot.in_flight(), None);
        assert_eq!(slot.calls(), 1);
        slot.reset();
        assert_eq!(slot.calls(), 0);
        assert_eq!(board.slot(0).calls(), 0);
    }

    #[test]
    fn latency_lands_in_its_bucket_and_totals_add_up() {
        let board = Scoreboard::new(1).unwrap();
        let stats = &board.slot(0).stats;
        let plugin = stats.plugin(0).unwrap();
        plugin.record_latency(std::time::Duration::from_micros(7));
        plugin.record_latency(std::time::Duration::from_millis(2));
        plugin.record_failure(Outcome::Panic);
        plugin.record_latency(std::time::Duration::from_secs(5));
        plugin.record_failure(Outcome::Error);
        plugin.record_answered(1);
        plugin.record_answered(0);
        plugin.record_answered(1);
        assert_eq!(
            plugin.requests.get(),
            4,
            "answered and failed requests both count, timed or not"
        );
        assert_eq!(plugin.errors.get(), 2);
        assert_eq!(plugin.panics.get(), 1);
        assert_eq!(plugin.buckets[1].get(), 1, "7 µs is under the 10 µs bound");
        assert_eq!(plugin.buckets[8].get(), 1, "2 ms is under the 2.5 ms bound");
        assert_eq!(
            plugin.buckets[BUCKETS - 1].get(),
            1,
            "5 s is above every bound"
        );
        // A batch of 4 in 32 µs: 4 requests of 8 µs each (under 10 µs).
        plugin.record_latency_shared(std::time::Duration::from_micros(32), 4);
        assert_eq!(plugin.buckets[1].get(), 5);
        plugin.record_latency_shared(std::time::Duration::from_micros(32), 0);
        assert_eq!(plugin.buckets[1].get(), 5, "an empty batch records nothing");
        stats.connections_open.add(2);
        stats.connections_open.sub(1);
        let mut totals = Totals::default();
        totals.add(stats, &["upper".to_string()], true);
        let mut twice = totals.clone();
        twice.merge(&totals);
        assert_eq!(twice.plugins["upper"].requests, 8);
        assert_eq!(twice.connections_open, 2);
        board.slot(0).reset();
        assert_eq!(plugin.requests.get(), 0);
    }

    #[test]
    fn writes_in_a_forked_child_are_seen_by_the_parent() {
        let board = Scoreboard::new(1).unwrap();
        // SAFETY: the test child only touches the shared slot and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                board.slot(0).enter(7);
                // SAFETY: leave at once, without running the test harness's
                // exit handlers in the forked copy.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(board.slot(0).in_flight(), Some(7));
                assert_eq!(board.slot(0).calls(), 1);
            }
        }
    }
}
