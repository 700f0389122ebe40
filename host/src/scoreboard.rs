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
//! Cost per request: two relaxed atomic stores and one relaxed increment in
//! memory the worker already owns — no syscall, no lock, no clock read (the
//! master measures elapsed time by sampling, not the worker by timestamping).

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
    /// Set by the worker once its plugins are loaded and it is accepting:
    /// the master waits for it before draining the worker it replaces.
    ready: AtomicU32,
    /// Set by the worker when it wants to be replaced (it served
    /// `max_requests_per_worker`); it keeps serving until the master drains it.
    retire: AtomicU32,
}

impl Slot {
    /// Records that `plugin` (an index into the config's plugins) is about
    /// to be called.
    #[inline]
    pub fn enter(&self, plugin: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.in_flight.store(plugin as u32 + 1, Ordering::Relaxed);
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

    /// Calls started so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Clears the slot for a new worker.
    pub fn reset(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.ready.store(0, Ordering::Relaxed);
        self.retire.store(0, Ordering::Relaxed);
    }

    /// The worker is serving (plugins loaded, listeners registered).
    pub fn set_ready(&self) {
        self.ready.store(1, Ordering::Release);
    }

    /// Whether the worker said it is serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) == 1
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
