//! Completion handles for deferred answers (ABI 1.3): the `nbnet_deferred`
//! a plugin gets from `resp->defer`, and the queue its completions go
//! through to the worker's reactor.
//!
//! # Safety against use after the connection is gone
//!
//! A handle points to a host-owned [`Cell`], never to the connection: the
//! cell holds only a token (a number the reactor looks up in its table of
//! pending requests) and the process-wide [`Completions`] queue. Completing
//! swaps the token out atomically (a second completion finds 0 and is
//! refused), copies the answer into host memory (nothing is freed across
//! the boundary), queues `(token, answer)` and wakes the reactor through a
//! `mio::Waker`. If the connection closed meanwhile, the reactor finds no
//! such token and drops the answer (counted).
//!
//! Cells are never freed: completed ones are reused, oldest first, and
//! only once [`QUARANTINE`] others wait to be reused, so that a plugin's
//! buggy second completion shortly after the first is refused rather than
//! completing another request.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nbnet_plugin_api::abi::{RawDeferred, NBNET_ERR, NBNET_OK};

use crate::codec::{header, HEADER_LEN};

/// Completed cells kept out of reuse (see the module doc).
const QUARANTINE: usize = 1024;
/// Most cells a handle maker takes for reuse at once (see
/// [`Completions::handle_from`]).
const STASH: usize = 64;

/// Completed cells taken out of the quarantine for reuse by one thread.
#[derive(Default)]
pub struct FreeCells(Vec<CellPtr>);

/// One completion: the token of the request and its answer (a complete
/// frame: header and payload) or why it failed.
#[derive(Debug)]
pub struct Done {
    /// The handle's token.
    pub token: u64,
    /// The response frame, or the failure to log.
    pub result: Result<Vec<u8>, String>,
}

/// A worker's completion queue, shared with every thread a plugin runs.
/// Lives as long as the process (handles may be completed at any time).
pub struct Completions {
    waker: Waker,
    max_frame_bytes: usize,
    queue: Mutex<Queue>,
    /// Completions refused because the handle was completed already.
    refused: AtomicU64,
}

struct Queue {
    done: Vec<Done>,
    /// Completed cells, oldest first.
    free: VecDeque<CellPtr>,
}

/// A cell's address, passed between threads under the queue's lock.
struct CellPtr(*mut Cell);
// SAFETY: cells are leaked, never freed, and only reached through atomics
// (the token) and immutable fields once made.
unsafe impl Send for CellPtr {}

/// The memory behind one `nbnet_deferred`. `#[repr(C)]` with the handle
/// first: the callbacks find the cell from the handle's address.
#[repr(C)]
struct Cell {
    raw: RawDeferred,
    /// The request's token; 0 once completed.
    token: AtomicU64,
    completions: &'static Completions,
}

impl Completions {
    /// A queue that wakes `poll`'s reactor with `token`. Leaked: handles
    /// refer to it until the process exits.
    pub fn new(
        registry: &mio::Registry,
        token: mio::Token,
        max_frame_bytes: usize,
    ) -> std::io::Result<&'static Completions> {
        let waker = Waker::new(registry, token)?;
        Ok(Box::leak(Box::new(Completions {
            waker,
            max_frame_bytes,
            queue: Mutex::new(Queue {
                done: Vec::new(),
                free: VecDeque::new(),
            }),
            refused: AtomicU64::new(0),
        })))
    }

    /// A handle for the request `token` (non-zero).
    pub fn handle(&'static self, token: u64) -> *mut RawDeferred {
        let reused = {
            let mut queue = self.lock();
            if queue.free.len() > QUARANTINE {
                queue.free.pop_front()
            } else {
                None
            }
        };
        self.make(reused, token)
    }

    /// A handle for the request `token` (non-zero), reusing a cell from
    /// `stash` (the caller's own, refilled here under one lock for up to
    /// [`STASH`] handles): the thread making handles then rarely takes the
    /// lock that completing threads take for every answer.
    pub fn handle_from(&'static self, stash: &mut FreeCells, token: u64) -> *mut RawDeferred {
        if stash.0.is_empty() {
            let mut queue = self.lock();
            let reusable = queue.free.len().saturating_sub(QUARANTINE).min(STASH);
            stash.0.extend(queue.free.drain(..reusable));
        }
        self.make(stash.0.pop(), token)
    }

    /// A handle for `token` in `reused` (a cell out of quarantine), or in
    /// a new cell.
    fn make(&'static self, reused: Option<CellPtr>, token: u64) -> *mut RawDeferred {
        let cell = match reused {
            Some(CellPtr(cell)) => cell,
            None => Box::into_raw(Box::new(Cell {
                raw: RawDeferred {
                    answer: deferred_answer,
                    fail: deferred_fail,
                    host: std::ptr::null_mut(),
                },
                token: AtomicU64::new(0),
                completions: self,
            })),
        };
        // SAFETY: a leaked cell that no handle refers to any more (just
        // made, or completed and quarantined): this thread is the only one
        // setting it up. The plugin may have overwritten the callbacks of
        // a handle it completed: they are set again.
        unsafe {
            (*cell).raw = RawDeferred {
                answer: deferred_answer,
                fail: deferred_fail,
                host: cell.cast::<c_void>(),
            };
            (*cell).token.store(token, Ordering::Release);
            std::ptr::addr_of_mut!((*cell).raw)
        }
    }

    /// Takes every completion queued so far.
    pub fn take(&self) -> Vec<Done> {
        std::mem::take(&mut self.lock().done)
    }

    /// Takes every completion queued so far into `into` (empty), leaving
    /// `into`'s allocation to the queue: no allocation per wake-up.
    pub fn take_into(&self, into: &mut Vec<Done>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.lock().done, into);
    }

    /// Completions refused so far (completed twice).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half
        // updated (pushes only): carry on with it.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token of a live handle (0 once it was completed).
    ///
    /// # Safety
    /// `d` must be a live handle made by [`Completions::handle`] or
    /// [`Completions::handle_from`].
    pub unsafe fn token_of(d: *mut RawDeferred) -> u64 {
        // SAFETY: the caller's promise.
        unsafe { cell(d) }.token.load(Ordering::Acquire)
    }

    /// Takes a handle back without completing it: its request is not
    /// answered here (a thread pool's queued request going, unstarted, to
    /// another worker). Returns the request's token, or `None` if the
    /// handle had been completed already. The handle must not be used
    /// again.
    ///
    /// # Safety
    /// `d` must be a live handle made by [`Completions::handle`] or
    /// [`Completions::handle_from`], owned by the caller.
    pub unsafe fn withdraw(d: *mut RawDeferred) -> Option<u64> {
        // SAFETY: the caller's promise.
        let cell = unsafe { cell(d) };
        let token = cell.token.swap(0, Ordering::AcqRel);
        if token == 0 {
            return None;
        }
        // As after a completion: the cell is reused after quarantine.
        cell.completions
            .lock()
            .free
            .push_back(CellPtr(std::ptr::from_ref(cell).cast_mut()));
        Some(token)
    }

    fn complete(&self, cell: &Cell, result: Result<Vec<u8>, String>) -> i32 {
        let token = cell.token.swap(0, Ordering::AcqRel);
        if token == 0 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            // The reactor counts refusals when it wakes: wake it, or the
            // count waits for the next completion (and /metrics lags).
            let _ = self.waker.wake();
            return NBNET_ERR;
        }
        let wake = {
            let mut queue = self.lock();
            queue.done.push(Done { token, result });
            queue
                .free
                .push_back(CellPtr(std::ptr::from_ref(cell).cast_mut()));
            // One wake-up per batch of completions: the reactor takes them
            // all at once.
            queue.done.len() == 1
        };
        if wake {
            if let Err(e) = self.waker.wake() {
                tracing::error!("cannot wake the worker for a deferred answer: {e}");
            }
        }
        NBNET_OK
    }
}

/// Wakes the reactor from any thread: an eventfd registered in its poll
/// (what `mio::Waker` does on Linux), made here so that its descriptor is
/// known and can be kept out of the processes plugins fork
/// ([`crate::fork_guard::protect`]): a plugin's child that kept it could
/// wake the worker, and would hold a descriptor of the worker.
struct Waker(std::os::fd::OwnedFd);

impl Waker {
    fn new(registry: &mio::Registry, token: mio::Token) -> std::io::Result<Waker> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: plain syscall; the descriptor it returns is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        crate::fork_guard::protect(fd.as_raw_fd());
        registry.register(
            &mut mio::unix::SourceFd(&fd.as_raw_fd()),
            token,
            mio::Interest::READABLE,
        )?;
        Ok(Waker(fd))
    }

    /// Adds one to the counter: the (edge-triggered) poll reports the
    /// descriptor readable again on every write, so it is never read
    /// except to reset a full counter.
    fn wake(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        loop {
            // SAFETY: writes 8 bytes from a live buffer to our descriptor.
            let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if n >= 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            match error.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => {
                    // The counter is full: read it back to 0, then write.
                    let mut drained = [0u8; 8];
                    // SAFETY: reads 8 bytes into a live buffer.
                    unsafe {
                        libc::read(
                            self.0.as_raw_fd(),
                            drained.as_mut_ptr().cast(),
                            drained.len(),
                        )
                    };
                }
                _ => return Err(error),
            }
        }
    }
}

/// The cell behind a handle.
///
/// # Safety
/// `d` must be a handle made by [`Completions::handle`].
unsafe fn cell<'c>(d: *mut RawDeferred) -> &'c Cell {
    // The cell is found from the handle's own address (its first field),
    // not from `host`, which the plugin can overwrite.
    // SAFETY: guaranteed by the caller; cells are never freed.
    unsafe { &*d.cast::<Cell>() }
}

unsafe extern "C" fn deferred_answer(d: *mut RawDeferred, data: *const u8, len: usize) -> i32 {
    if d.is_null() {
        return NBNET_ERR;
    }
    // SAFETY: plugins pass handles made by `Completions::handle`.
    let cell = unsafe { cell(d) };
    let completions = cell.completions;
    let result = if len > completions.max_frame_bytes {
        Err(format!(
            "its deferred answer of {len} bytes exceeds max_frame_bytes = {}; the host refused it",
            completions.max_frame_bytes
        ))
    } else if data.is_null() && len > 0 {
        Err(format!("answered NULL with length {len}"))
    } else {
        let mut frame = Vec::with_capacity(HEADER_LEN + len);
        frame.extend_from_slice(&header(len));
        if len > 0 {
            // SAFETY: the plugin passes `len` readable bytes at `data`
            // (non-null, checked), copied before this returns.
            frame.extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
        }
        Ok(frame)
    };
    completions.complete(cell, result)
}

unsafe extern "C" fn deferred_fail(d: *mut RawDeferred, msg: *const u8, len: usize) -> i32 {
    if d.is_null() {
        return NBNET_ERR;
    }
    // SAFETY: as in `deferred_answer`.
    let cell = unsafe { cell(d) };
    let message = super::lossy(msg, len);
    let message = if message.is_empty() {
        "failed its deferred request without a message".to_string()
    } else {
        message
    };
    cell.completions.complete(cell, Err(message))
}
