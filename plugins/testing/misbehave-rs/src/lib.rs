//! `misbehave_rs`: a test-only Rust plugin that misbehaves on request, so the
//! black-box tests can check how the host contains a faulty plugin. The
//! request payload decides:
//!
//! | request     | behaviour                                                        |
//! |-------------|------------------------------------------------------------------|
//! | `ok`        | answers `ok <pid> <calls>`: the worker's pid and how many requests this instance has seen (this one included) |
//! | `pid`       | answers the worker's pid                                         |
//! | `panic`     | `panic!("misbehave_rs panics on purpose")` (the SDK catches it)  |
//! | `segfault`  | writes through a null pointer: the worker dies from SIGSEGV      |
//! | `abort`     | `std::process::abort()`: the worker dies from SIGABRT            |
//! | `hang`      | spins forever (the host's watchdog must kill the worker)         |
//! | `sleep:MS`  | sleeps MS milliseconds, then answers `slept MS`                  |
//! | `error`     | returns the error `misbehave_rs refuses on purpose`              |
//! | `huge`      | writes 1 MiB chunks until the host refuses one, then returns that error |
//! | `big:N`     | answers N bytes of `x`                                           |
//! | anything else | echoed back                                                    |
//!
//! The calls counter counts every `process` call of this instance, so a test
//! can see that the same instance survived a panic.

use std::time::Duration;

use nbnet_plugin_api::{export_plugin, Error, InitContext, NoConfig, Plugin, Response};

/// Message of the `panic` request's panic.
pub const PANIC_MESSAGE: &str = "misbehave_rs panics on purpose";
/// Message of the `error` request's error.
pub const ERROR_MESSAGE: &str = "misbehave_rs refuses on purpose";

/// The plugin: one instance per worker, counting its calls.
#[derive(Default)]
pub struct Misbehave {
    calls: u64,
}

impl Plugin for Misbehave {
    type Config = NoConfig;

    fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
        Ok(Misbehave::default())
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        self.calls += 1;
        match request {
            b"ok" => response.write(format!("ok {} {}", std::process::id(), self.calls).as_bytes()),
            b"pid" => response.write(std::process::id().to_string().as_bytes()),
            b"panic" => panic!("{PANIC_MESSAGE}"),
            b"segfault" => {
                // black_box: the compiler must not see (and reason about) the null.
                let null = std::hint::black_box(std::ptr::null_mut::<u8>());
                // SAFETY: none; crashing the worker with SIGSEGV is the point.
                unsafe { null.write_volatile(1) };
                Err(Error::new("the null write did not crash"))
            }
            b"abort" => std::process::abort(),
            b"hang" => loop {
                std::hint::spin_loop();
            },
            b"error" => Err(Error::new(ERROR_MESSAGE)),
            b"huge" => {
                let chunk = vec![b'h'; 1 << 20];
                loop {
                    response.write(&chunk)?;
                }
            }
            _ => {
                if let Some(ms) = number_after(request, b"sleep:") {
                    std::thread::sleep(Duration::from_millis(ms));
                    return response.write(format!("slept {ms}").as_bytes());
                }
                if let Some(n) = number_after(request, b"big:") {
                    let chunk = [b'x'; 4096];
                    let mut left = n as usize;
                    while left > 0 {
                        let step = left.min(chunk.len());
                        response.write(&chunk[..step])?;
                        left -= step;
                    }
                    return Ok(());
                }
                response.write(request)
            }
        }
    }
}

/// The decimal number after `prefix` in `request`, if that is all it holds.
fn number_after(request: &[u8], prefix: &[u8]) -> Option<u64> {
    let digits = request.strip_prefix(prefix)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

export_plugin!(Misbehave);

#[cfg(test)]
mod tests {
    use super::*;
    use nbnet_plugin_api::testing::TestHost;

    #[test]
    fn ok_counts_the_calls_of_this_instance_and_survives_a_panic() {
        let mut host = TestHost::<Misbehave>::new("").unwrap();
        let pid = std::process::id();
        assert_eq!(
            host.process(b"ok").unwrap(),
            format!("ok {pid} 1").into_bytes()
        );
        assert_eq!(
            host.process(b"panic").unwrap_err(),
            format!("panicked: {PANIC_MESSAGE}")
        );
        assert_eq!(
            host.process(b"ok").unwrap(),
            format!("ok {pid} 3").into_bytes()
        );
        assert_eq!(host.process(b"pid").unwrap(), pid.to_string().into_bytes());
    }

    #[test]
    fn error_huge_sleep_big_and_echo() {
        let mut host = TestHost::<Misbehave>::new("").unwrap();
        assert_eq!(host.process(b"error").unwrap_err(), ERROR_MESSAGE);
        host.max_response_bytes = 3 << 20;
        assert!(host
            .process(b"huge")
            .unwrap_err()
            .contains("max_frame_bytes"));
        assert_eq!(host.process(b"sleep:1").unwrap(), b"slept 1");
        assert_eq!(host.process(b"big:5000").unwrap(), vec![b'x'; 5000]);
        assert_eq!(host.process(b"sleep:x").unwrap(), b"sleep:x");
        assert_eq!(host.process(b"hello").unwrap(), b"hello");
    }

    #[test]
    fn a_batch_keeps_the_answers_before_a_panic_and_applies_the_limit_per_answer() {
        let mut host = TestHost::<Misbehave>::new("").unwrap();
        assert_eq!(
            host.process_batch(&[b"one", b"two"]).unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        let (before, error) = host
            .process_batch(&[b"first", b"panic", b"never"])
            .unwrap_err();
        assert_eq!(before, vec![b"first".to_vec()]);
        assert_eq!(error, format!("panicked: {PANIC_MESSAGE}"));
        host.max_response_bytes = 1000;
        let answers = host.process_batch(&[b"big:1000", b"big:1000"]).unwrap();
        assert_eq!(
            answers,
            vec![vec![b'x'; 1000]; 2],
            "each answer may reach the limit"
        );
        let (before, error) = host.process_batch(&[b"big:10", b"big:1001"]).unwrap_err();
        assert_eq!(before, vec![vec![b'x'; 10]]);
        assert!(error.contains("max_frame_bytes"), "{error}");
    }
}
