//! Test plugin: answers later, through `Response::defer` (ABI 1.3).
//!
//! Requests (text; `PAYLOAD` is answered back as is):
//! - `later MS PAYLOAD`: answered from a timer thread after `MS` ms
//!   (`later 0 x`: at once, from that thread).
//! - `rev N PAYLOAD`: held until `N` of them are held, then all answered
//!   from a thread in reverse order (the last one first).
//! - `inline PAYLOAD`: answered inline, not deferred.
//! - `handoff PAYLOAD`: answered inline, after handing a copy of PAYLOAD
//!   to a thread of its own as `later 0` does (the plugin's own hand-off
//!   cost, without the host's deferral: for benchmarks).
//! - `drop`: deferred, then the handle is dropped without an answer.
//! - `never`: deferred, and the handle is kept forever.
//! - `fail MSG`: deferred, then failed from a thread with `MSG`.
//! - `big N`: deferred, answered from a thread with `N` bytes of `x`.
//! - `crash`: aborts the worker.
//! - `pending`: inline: how many `never` handles this instance holds.
//! - `pid`: inline: the worker's process id.
//! - anything else: echoed inline.

use std::collections::BinaryHeap;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nbnet_plugin_api::{export_plugin, Deferred, Error, InitContext, NoConfig, Plugin, Response};

/// A deferred answer due at `at`.
struct Job {
    at: Instant,
    seq: u64,
    deferred: Deferred,
    answer: Result<Vec<u8>, String>,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The plugin: a timer thread (started in `new`, i.e. in the worker after
/// fork) and the handles it holds back.
pub struct DeferPlugin {
    timer: Sender<Job>,
    seq: u64,
    held: Vec<(Deferred, Vec<u8>)>,
    never: Vec<Deferred>,
    /// Takes `handoff` copies (and drops them).
    sink: Sender<Vec<u8>>,
}

/// Looks for a job for a few microseconds before the thread blocks: requests
/// come in bursts (one per connection of a read), and a thread that sleeps
/// after each one costs the sender a wake-up (a `futex` call on the
/// reactor thread) per request.
fn spin_for_a_job<T>(jobs: &std::sync::mpsc::Receiver<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if let Ok(job) = jobs.try_recv() {
                return Some(job);
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > Duration::from_micros(20) {
            return None;
        }
    }
}

fn timer_thread(jobs: std::sync::mpsc::Receiver<Job>) {
    let mut heap: BinaryHeap<Job> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|job| job.at <= now) {
            let Some(job) = heap.pop() else { break };
            match job.answer {
                Ok(bytes) => job.deferred.answer(&bytes),
                Err(message) => job.deferred.fail(message),
            }
        }
        let next = match spin_for_a_job(&jobs) {
            Some(job) => Ok(job),
            None => match heap.peek() {
                Some(job) => jobs.recv_timeout(job.at.saturating_duration_since(now)),
                None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            },
        };
        match next {
            Ok(job) => heap.push(job),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl DeferPlugin {
    fn schedule(&mut self, after: Duration, deferred: Deferred, answer: Result<Vec<u8>, String>) {
        self.seq += 1;
        let job = Job {
            at: Instant::now() + after,
            seq: self.seq,
            deferred,
            answer,
        };
        // The timer thread lives as long as the instance.
        let _ = self.timer.send(job);
    }
}

impl Plugin for DeferPlugin {
    type Config = NoConfig;

    fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
        let (timer, jobs) = channel();
        std::thread::Builder::new()
            .name("defer-timer".into())
            .spawn(move || timer_thread(jobs))
            .map_err(|e| Error::new(format!("cannot start the timer thread: {e}")))?;
        let (sink, copies) = channel::<Vec<u8>>();
        std::thread::Builder::new()
            .name("defer-sink".into())
            .spawn(move || {
                // The same spin before blocking as the timer thread, so that
                // `handoff` stays the control for `later 0`.
                while spin_for_a_job(&copies).is_some() || copies.recv().is_ok() {}
            })
            .map_err(|e| Error::new(format!("cannot start the sink thread: {e}")))?;
        Ok(DeferPlugin {
            sink,
            timer,
            seq: 0,
            held: Vec::new(),
            never: Vec::new(),
        })
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        let text = String::from_utf8_lossy(request);
        let mut words = text.splitn(3, ' ');
        let command = words.next().unwrap_or("");
        let first = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("");
        match command {
            "later" => {
                let ms: u64 = first.parse().map_err(|_| Error::new("later MS PAYLOAD"))?;
                let deferred = response.defer();
                self.schedule(
                    Duration::from_millis(ms),
                    deferred,
                    Ok(rest.as_bytes().to_vec()),
                );
            }
            "rev" => {
                let n: usize = first.parse().map_err(|_| Error::new("rev N PAYLOAD"))?;
                let deferred = response.defer();
                self.held.push((deferred, rest.as_bytes().to_vec()));
                if self.held.len() >= n {
                    let held = std::mem::take(&mut self.held);
                    std::thread::spawn(move || {
                        for (deferred, answer) in held.into_iter().rev() {
                            deferred.answer(&answer);
                        }
                    });
                }
            }
            "handoff" => {
                let payload = format!("{first} {rest}");
                let _ = self.sink.send(payload.as_bytes().to_vec());
                response.write(&request[request.len().min(8)..])?;
            }
            "inline" => {
                let payload = &request[request.len().min(7)..];
                response.write(payload)?;
            }
            "drop" => drop(response.defer()),
            "never" => self.never.push(response.defer()),
            "fail" => {
                let deferred = response.defer();
                let message = format!("{first} {rest}").trim().to_string();
                self.schedule(Duration::ZERO, deferred, Err(message));
            }
            "big" => {
                let n: usize = first.parse().map_err(|_| Error::new("big N"))?;
                let deferred = response.defer();
                self.schedule(Duration::ZERO, deferred, Ok(vec![b'x'; n]));
            }
            "crash" => std::process::abort(),
            "pending" => response.write(self.never.len().to_string().as_bytes())?,
            "pid" => response.write(std::process::id().to_string().as_bytes())?,
            // Anything else (the test harness's readiness probe) is echoed.
            _ => response.write(request)?,
        }
        Ok(())
    }
}

export_plugin!(DeferPlugin);
