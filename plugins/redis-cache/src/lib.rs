//! `redis-cache`: `SET` / `GET` / `DEL` stored in a real Redis server, to
//! show a plugin that waits on the network — run on a thread pool.
//!
//! # State is shared by every worker (unlike `kv`)
//!
//! The [`kv`](../../kv/src/lib.rs) example keeps its store in each worker
//! process, so a key `SET` on one connection may be missing on another that
//! the kernel handed to another worker. Here the store is a Redis server:
//! every worker (and every pool thread of every worker) talks to the same
//! one, so a value `SET` through any connection is read back through any
//! other, and it survives worker restarts (as long as Redis keeps it).
//!
//! # Run it with `threads`
//!
//! Each call blocks while Redis answers (the `redis` crate's blocking
//! client). With `threads = N` in its `[[plugins]]` table, each worker makes
//! N instances, one per pool thread, and each instance opens **its own
//! connection** to Redis (one client per pool instance, nothing shared, no
//! locks): up to `workers × threads` connections in all. Without `threads`
//! the plugin still works, but every call stalls its worker's reactor for
//! a round trip to Redis; it logs a warning at init saying so.
//!
//! ```toml
//! [[plugins]]
//! name = "cache"
//! path = "../target/release/libredis_cache.so"
//! threads = 16
//! config = { url = "redis://127.0.0.1:6379/0", timeout_ms = 1000, prefix = "nbnet:" }
//! ```
//!
//! # Protocol (the request payload), as in `kv`
//!
//! | request | response |
//! |---|---|
//! | `SET key value` | `OK` |
//! | `GET key` | the value, or `NOT_FOUND` |
//! | `DEL key` | `OK`, or `NOT_FOUND` |
//! | anything else | `ERR <what is wrong>` |
//!
//! Command names are ASCII case-insensitive. A key is one or more bytes
//! without ASCII whitespace; the value is every byte after the space that
//! follows the key (binary-safe, may be empty). A malformed request is
//! answered with `ERR …`, and the connection goes on.
//!
//! # When Redis is not there
//!
//! - An unparsable `url` fails init, naming it: the worker does not start.
//! - A Redis that cannot be reached at init is logged as a warning and the
//!   worker starts anyway (Redis may come up later); each instance connects
//!   again on its next request.
//! - A request that cannot reach Redis **fails** (the host closes that
//!   connection and logs the message, which names the URL — its password
//!   hidden — and what went wrong); a stale connection (Redis restarted) is
//!   retried once on a fresh connection first, which is safe because
//!   `GET`, `SET` and `DEL` are idempotent.

use std::time::Duration;

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};
use serde::Deserialize;

/// The plugin's `config` table; unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Redis server: `redis://[:password@]host[:port][/db]` or
    /// `redis+unix:///path/to/redis.sock[?db=N]`.
    pub url: String,
    /// Connect, read and write timeout of each Redis call, in milliseconds
    /// (1 to 3 600 000). A call that takes longer fails its request.
    pub timeout_ms: u64,
    /// Prepended to every key in Redis (e.g. `"nbnet:"`), so that several
    /// services can share one Redis database.
    pub prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: "redis://127.0.0.1:6379".into(),
            timeout_ms: 1000,
            prefix: String::new(),
        }
    }
}

/// One instance: one Redis connection (made again after an error).
pub struct RedisCache {
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// The URL with its password hidden, for messages.
    shown_url: String,
    timeout: Duration,
    prefix: Vec<u8>,
    /// `prefix + key`, reused across requests.
    key: Vec<u8>,
}

impl Plugin for RedisCache {
    type Config = Config;

    fn new(config: Config, ctx: &InitContext) -> Result<Self, Error> {
        let shown_url = hide_password(&config.url);
        if !(1..=3_600_000).contains(&config.timeout_ms) {
            return Err(Error::new(format!(
                "invalid config: timeout_ms = {} (must be 1 to 3600000 milliseconds)",
                config.timeout_ms
            )));
        }
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            Error::new(format!(
                "invalid config: url = {shown_url:?} is not a Redis URL ({e}); expected redis://host:port/db or redis+unix:///path"
            ))
        })?;
        let mut cache = RedisCache {
            client,
            conn: None,
            shown_url,
            timeout: Duration::from_millis(config.timeout_ms),
            prefix: config.prefix.into_bytes(),
            key: Vec::new(),
        };
        let logger = ctx.logger();
        if ctx.thread_count() == 0 {
            logger.warn(
                "runs on the worker's reactor thread: each call stalls every connection of the worker until Redis answers; set threads = N in its [[plugins]] table",
            );
        }
        match cache.connect() {
            Ok(conn) => {
                cache.conn = Some(conn);
                logger.debug(&format!(
                    "worker {} thread {} of {}: connected to redis at {}",
                    ctx.worker_index(),
                    ctx.thread_index(),
                    ctx.thread_count(),
                    cache.shown_url
                ));
            }
            Err(e) => logger.warn(&format!(
                "{e}; starting anyway, requests fail until Redis can be reached (each one tries again)"
            )),
        }
        Ok(cache)
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        let (command, rest) = split_word(request);
        if command.eq_ignore_ascii_case(b"GET") {
            let Some(key) = rest.and_then(single_key) else {
                return response.write(b"ERR usage: GET key");
            };
            self.set_key(key);
            let value: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&self.key))?;
            match value {
                Some(value) => response.write(&value),
                None => response.write(b"NOT_FOUND"),
            }
        } else if command.eq_ignore_ascii_case(b"SET") {
            let Some((key, Some(value))) = rest.map(split_word) else {
                return response.write(b"ERR usage: SET key value");
            };
            if !is_key(key) {
                return response.write(b"ERR usage: SET key value");
            }
            self.set_key(key);
            let () = self.query(redis::cmd("SET").arg(&self.key).arg(value))?;
            response.write(b"OK")
        } else if command.eq_ignore_ascii_case(b"DEL") {
            let Some(key) = rest.and_then(single_key) else {
                return response.write(b"ERR usage: DEL key");
            };
            self.set_key(key);
            let removed: u64 = self.query(redis::cmd("DEL").arg(&self.key))?;
            response.write(if removed > 0 { b"OK" } else { b"NOT_FOUND" })
        } else {
            // The command itself is not echoed back: it may be any bytes.
            response.write(b"ERR unknown command: use SET key value, GET key or DEL key")
        }
    }
}

impl RedisCache {
    fn connect(&self) -> Result<redis::Connection, Error> {
        let conn = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(|e| self.error("cannot connect", &e))?;
        conn.set_read_timeout(Some(self.timeout))
            .and_then(|()| conn.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.error("cannot set timeouts", &e))?;
        Ok(conn)
    }

    /// Runs `cmd` on this instance's connection (made if there is none).
    /// A connection that turns out stale is replaced and the command tried
    /// once more; any error drops the connection (the next request makes a
    /// new one) and fails the request.
    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, Error> {
        let reused = self.conn.is_some();
        for attempt in 0..2 {
            let conn = match &mut self.conn {
                Some(conn) => conn,
                None => self.conn.insert(self.connect()?),
            };
            match cmd.query::<T>(conn) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    self.conn = None;
                    let stale = e.is_connection_dropped() || e.is_io_error() && !e.is_timeout();
                    if !(reused && stale && attempt == 0) {
                        return Err(self.error("request failed", &e));
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn error(&self, what: &str, e: &redis::RedisError) -> Error {
        let hint = if e.is_timeout() {
            format!(
                " (no answer within timeout_ms = {})",
                self.timeout.as_millis()
            )
        } else if e.is_connection_refusal() || e.is_io_error() {
            " (is redis-server running there?)".to_string()
        } else {
            String::new()
        };
        Error::new(format!("redis at {}: {what}: {e}{hint}", self.shown_url))
    }

    fn set_key(&mut self, key: &[u8]) {
        self.key.clear();
        self.key.extend_from_slice(&self.prefix);
        self.key.extend_from_slice(key);
    }
}

/// `url` with the password of its user-info part replaced by `***`.
pub fn hide_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &url[scheme_end..scheme_end + at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &url[scheme_end + at..]
        ),
        None => url.to_string(),
    }
}

/// Splits `text` at its first space: the word before it, and everything
/// after it (`None` when there is no space).
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

export_plugin!(RedisCache);

#[cfg(test)]
mod tests {
    use nbnet_plugin_api::testing::TestHost;

    use super::{hide_password, RedisCache};

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(hide_password("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            hide_password("redis://user:secret@h:1"),
            "redis://user:***@h:1"
        );
        assert_eq!(hide_password("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(hide_password("redis://user@h"), "redis://user@h");
        assert_eq!(hide_password("not a url"), "not a url");
    }

    #[test]
    fn a_bad_url_or_timeout_fails_init_naming_it() {
        let bad = TestHost::<RedisCache>::new(r#"url = "http://:pw@example/""#)
            .err()
            .expect("not a Redis URL");
        assert!(bad.contains(r#"url = "http://:***@example/""#), "{bad}");
        assert!(!bad.contains("pw"), "the password is hidden: {bad}");
        let timeout = TestHost::<RedisCache>::new("timeout_ms = 0")
            .err()
            .expect("0 refused");
        assert!(timeout.contains("timeout_ms = 0"), "{timeout}");
        let unknown = TestHost::<RedisCache>::new(r#"uri = "redis://h""#)
            .err()
            .expect("unknown key refused");
        assert!(unknown.contains("uri"), "{unknown}");
    }

    #[test]
    fn redis_down_starts_with_a_warning_and_fails_requests_naming_the_url() {
        // A port nobody listens on (bound then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://:pw@127.0.0.1:{port}/0");
        let mut host = TestHost::<RedisCache>::new(&format!("url = {url:?}")).unwrap();
        let shown = format!("redis at redis://:***@127.0.0.1:{port}/0");
        assert!(
            host.logs()
                .iter()
                .any(|l| l.starts_with("WARN") && l.contains(&shown)),
            "{:?}",
            host.logs()
        );
        // Malformed requests are still answered (no Redis needed).
        assert_eq!(host.process(b"GET").unwrap(), b"ERR usage: GET key");
        let error = host.process(b"GET a").unwrap_err();
        assert!(error.contains(&shown), "{error}");
        assert!(error.contains("is redis-server running there?"), "{error}");
    }
}
