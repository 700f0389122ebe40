//! `kv`: an in-memory key-value store, to show a plugin that keeps state.
//!
//! # State is per worker process, not shared
//!
//! nbnet forks several worker processes and each one creates its own `Kv`
//! instance, so **every worker has its own, separate store**. A client that
//! `SET`s a key on one connection may get `NOT_FOUND` for it on another
//! connection, because the kernel may hand that connection to another worker.
//! One connection always stays on one worker, so within a connection the
//! store behaves as expected. Run with `workers = 1` for a single store (the
//! data is lost when the worker restarts either way). Sharing state across
//! workers takes something outside the plugin (a database, shared memory).
//!
//! # Protocol (the request payload)
//!
//! | request | response |
//! |---|---|
//! | `SET key value` | `OK` (or `ERR full` when `max_keys` keys exist and `key` is new) |
//! | `GET key` | the value, or `NOT_FOUND` |
//! | `DEL key` | `OK`, or `NOT_FOUND` |
//! | `STATS` | `worker=0 workers=2 keys=3 max_keys=100000` |
//! | anything else | `ERR <what is wrong>` |
//!
//! Command names are ASCII case-insensitive. A key is one or more bytes
//! without ASCII whitespace; the value is every byte after the space that
//! follows the key (it may contain spaces, may be empty, need not be UTF-8).
//!
//! A malformed request is **answered** with `ERR …` rather than failed with
//! an [`Error`]: an error from `process` makes the host close the connection,
//! and a client that made a typo should be able to go on. `process` returns an
//! `Err` only when the host refuses the response (larger than
//! `max_frame_bytes`), which cannot happen here: a value is never longer than
//! the request that stored it.
//!
//! # Config
//!
//! ```toml
//! [[plugins]]
//! name = "kv"
//! path = "../target/release/libkv.so"
//! config = { max_keys = 100000 }   # optional; the default is 100000
//! ```

use std::collections::HashMap;

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};
use serde::Deserialize;

/// The plugin's `config` table. Unknown keys are refused (`deny_unknown_fields`)
/// so that a typo such as `max_key` fails at startup instead of being ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Most keys one worker's store holds; past it, `SET` of a new key answers
    /// `ERR full`. Bounds the memory a client can make a worker use.
    pub max_keys: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_keys: 100_000 }
    }
}

/// One worker's store.
pub struct Kv {
    /// The standard `HashMap` with its default, randomly keyed SipHash: keys
    /// come from clients, and a fixed fast hash would let one client make
    /// every key collide and stall the worker.
    map: HashMap<Vec<u8>, Vec<u8>>,
    max_keys: usize,
    worker_index: u32,
    worker_count: u32,
}

impl Plugin for Kv {
    type Config = Config;

    fn new(config: Config, ctx: &InitContext) -> Result<Self, Error> {
        if config.max_keys == 0 {
            return Err(Error::new("invalid config: max_keys must be at least 1"));
        }
        ctx.logger().info(&format!(
            "worker {} of {}: in-memory store of up to {} keys (per worker, not shared)",
            ctx.worker_index(),
            ctx.worker_count(),
            config.max_keys
        ));
        Ok(Kv {
            map: HashMap::new(),
            max_keys: config.max_keys,
            worker_index: ctx.worker_index(),
            worker_count: ctx.worker_count(),
        })
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        let (command, rest) = split_word(request);
        if command.eq_ignore_ascii_case(b"GET") {
            match rest.and_then(single_key) {
                None => response.write(b"ERR usage: GET key"),
                Some(key) => match self.map.get(key) {
                    Some(value) => response.write(value),
                    None => response.write(b"NOT_FOUND"),
                },
            }
        } else if command.eq_ignore_ascii_case(b"SET") {
            let Some((key, Some(value))) = rest.map(split_word) else {
                return response.write(b"ERR usage: SET key value");
            };
            if !is_key(key) {
                return response.write(b"ERR usage: SET key value");
            }
            if let Some(slot) = self.map.get_mut(key) {
                // Overwriting never grows the store, so it is allowed when full.
                slot.clear();
                slot.extend_from_slice(value);
            } else if self.map.len() >= self.max_keys {
                return response.write(b"ERR full");
            } else {
                self.map.insert(key.to_vec(), value.to_vec());
            }
            response.write(b"OK")
        } else if command.eq_ignore_ascii_case(b"DEL") {
            match rest.and_then(single_key) {
                None => response.write(b"ERR usage: DEL key"),
                Some(key) => match self.map.remove(key) {
                    Some(_) => response.write(b"OK"),
                    None => response.write(b"NOT_FOUND"),
                },
            }
        } else if command.eq_ignore_ascii_case(b"STATS") && rest.is_none() {
            let stats = format!(
                "worker={} workers={} keys={} max_keys={}",
                self.worker_index,
                self.worker_count,
                self.map.len(),
                self.max_keys
            );
            response.write(stats.as_bytes())
        } else {
            // The command itself is not echoed back: it may be any bytes.
            response.write(b"ERR unknown command: use SET key value, GET key, DEL key or STATS")
        }
    }
}

/// Splits `text` at its first space: the word before it, and everything after
/// it (`None` when there is no space).
fn split_word(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == b' ') {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    }
}

/// A key: at least one byte, no ASCII whitespace.
fn is_key(key: &[u8]) -> bool {
    !key.is_empty() && !key.iter().any(u8::is_ascii_whitespace)
}

/// `rest` if it is exactly one key (for `GET` and `DEL`).
fn single_key(rest: &[u8]) -> Option<&[u8]> {
    is_key(rest).then_some(rest)
}

export_plugin!(Kv);

#[cfg(test)]
mod tests {
    use nbnet_plugin_api::testing::TestHost;

    use super::Kv;

    fn host() -> TestHost<Kv> {
        TestHost::new("").expect("default config is valid")
    }

    fn ask(host: &mut TestHost<Kv>, request: &str) -> String {
        let answer = host
            .process(request.as_bytes())
            .expect("kv never fails a request");
        String::from_utf8(answer).expect("UTF-8 answer")
    }

    #[test]
    fn set_get_del() {
        let mut kv = host();
        assert_eq!(ask(&mut kv, "GET a"), "NOT_FOUND");
        assert_eq!(ask(&mut kv, "SET a 1"), "OK");
        assert_eq!(ask(&mut kv, "GET a"), "1");
        assert_eq!(ask(&mut kv, "SET a two words"), "OK");
        assert_eq!(ask(&mut kv, "GET a"), "two words");
        assert_eq!(ask(&mut kv, "DEL a"), "OK");
        assert_eq!(ask(&mut kv, "DEL a"), "NOT_FOUND");
        assert_eq!(ask(&mut kv, "GET a"), "NOT_FOUND");
    }

    #[test]
    fn commands_are_case_insensitive_and_values_may_be_empty_or_binary() {
        let mut kv = host();
        assert_eq!(ask(&mut kv, "set k "), "OK");
        assert_eq!(ask(&mut kv, "get k"), "");
        assert_eq!(kv.process(b"SET bin \xff\x00\xfe").unwrap(), b"OK");
        assert_eq!(kv.process(b"Get bin").unwrap(), b"\xff\x00\xfe");
    }

    #[test]
    fn malformed_requests_are_answered_not_failed() {
        let mut kv = host();
        for (request, answer) in [
            ("GET", "ERR usage: GET key"),
            ("GET ", "ERR usage: GET key"),
            ("GET a b", "ERR usage: GET key"),
            ("DEL", "ERR usage: DEL key"),
            ("SET a", "ERR usage: SET key value"),
            ("SET  value", "ERR usage: SET key value"),
            ("SET a\tb c", "ERR usage: SET key value"),
            (
                "STATS x",
                "ERR unknown command: use SET key value, GET key, DEL key or STATS",
            ),
            (
                "PUT a 1",
                "ERR unknown command: use SET key value, GET key, DEL key or STATS",
            ),
        ] {
            assert_eq!(ask(&mut kv, request), answer, "request {request:?}");
        }
        // The instance still works after errors.
        assert_eq!(ask(&mut kv, "SET a 1"), "OK");
    }

    #[test]
    fn max_keys_is_honoured() {
        let mut kv = TestHost::<Kv>::new("max_keys = 2").unwrap();
        assert_eq!(ask(&mut kv, "SET a 1"), "OK");
        assert_eq!(ask(&mut kv, "SET b 2"), "OK");
        assert_eq!(ask(&mut kv, "SET c 3"), "ERR full");
        assert_eq!(ask(&mut kv, "GET c"), "NOT_FOUND");
        // Overwriting an existing key does not grow the store: allowed when full.
        assert_eq!(ask(&mut kv, "SET a 10"), "OK");
        assert_eq!(ask(&mut kv, "GET a"), "10");
        // Deleting makes room.
        assert_eq!(ask(&mut kv, "DEL b"), "OK");
        assert_eq!(ask(&mut kv, "SET c 3"), "OK");
        assert_eq!(
            ask(&mut kv, "STATS"),
            "worker=0 workers=1 keys=2 max_keys=2"
        );
    }

    #[test]
    fn config_is_checked() {
        let unknown = TestHost::<Kv>::new("max_key = 5")
            .err()
            .expect("unknown key refused");
        assert!(unknown.contains("max_key"), "{unknown}");
        let wrong_type = TestHost::<Kv>::new("max_keys = \"many\"")
            .err()
            .expect("string refused");
        assert!(wrong_type.contains("invalid config"), "{wrong_type}");
        let negative = TestHost::<Kv>::new("max_keys = -1")
            .err()
            .expect("negative refused");
        assert!(negative.contains("invalid config"), "{negative}");
        let zero = TestHost::<Kv>::new("max_keys = 0")
            .err()
            .expect("zero refused");
        assert!(zero.contains("max_keys must be at least 1"), "{zero}");
    }

    #[test]
    fn logs_its_size_and_worker_once_at_init() {
        let kv = TestHost::<Kv>::with_worker("max_keys = 7", 1, 2).unwrap();
        assert_eq!(
            kv.logs(),
            ["INFO worker 1 of 2: in-memory store of up to 7 keys (per worker, not shared)"]
        );
    }

    #[test]
    fn each_instance_has_its_own_store() {
        // Two instances stand for two workers: what one stores, the other lacks.
        let mut first = TestHost::<Kv>::with_worker("", 0, 2).unwrap();
        let mut second = TestHost::<Kv>::with_worker("", 1, 2).unwrap();
        assert_eq!(ask(&mut first, "SET a 1"), "OK");
        assert_eq!(ask(&mut second, "GET a"), "NOT_FOUND");
        assert_eq!(
            ask(&mut second, "STATS"),
            "worker=1 workers=2 keys=0 max_keys=100000"
        );
    }
}
