//! Results of a run: merging the threads' tallies, the human table, the JSON.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::payload::Expect;

/// Failures counted during a run (each also closes its connection, except mismatches).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Failures {
    /// Responses that were not the right answer to their request.
    pub mismatches: u64,
    /// Responses whose header was not valid framing.
    pub protocol: u64,
    /// Connections the server closed while requests were outstanding.
    pub closed: u64,
    /// Other socket errors (reset, ...).
    pub io: u64,
    /// Responses that arrived with no request outstanding.
    pub unexpected: u64,
    /// Up to a few messages describing the first failures.
    pub messages: Vec<String>,
}

impl Failures {
    /// All failures except mismatches.
    pub fn errors(&self) -> u64 {
        self.protocol + self.closed + self.io + self.unexpected
    }

    /// Keeps `message` if fewer than 5 are kept.
    pub fn note(&mut self, message: String) {
        if self.messages.len() < 5 {
            self.messages.push(message);
        }
    }

    /// Adds `other`'s counts and messages to these.
    pub fn merge(&mut self, other: Failures) {
        self.mismatches += other.mismatches;
        self.protocol += other.protocol;
        self.closed += other.closed;
        self.io += other.io;
        self.unexpected += other.unexpected;
        for m in other.messages {
            self.note(m);
        }
    }
}

/// The settings a report describes.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Server address.
    pub addr: String,
    /// Connections.
    pub conns: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Payload bytes per request.
    pub size: usize,
    /// Load generator threads.
    pub threads: usize,
    /// Response check.
    pub expect: Expect,
    /// Warm-up (not measured).
    pub warmup: Duration,
    /// Fixed number of requests, if the run is not timed.
    pub requests: Option<u64>,
    /// Measured time of a timed run (the time limit with `requests`).
    pub duration: Duration,
}

impl RunSettings {
    /// The table's first line, printed when the run starts: what is
    /// measured.
    pub fn header(&self) -> String {
        let shape = match self.requests {
            Some(n) => format!("{} requests", group(n)),
            None => format!(
                "{} (+{} warm-up)",
                humantime::format_duration(round_ms(self.duration)),
                humantime::format_duration(self.warmup)
            ),
        };
        format!(
            "nbnet bench {}: {} conns x depth {}, {} B payloads, {} thread(s), expect {}, {shape}\n",
            self.addr,
            self.conns,
            self.depth,
            self.size,
            self.threads,
            self.expect.name()
        )
    }
}

/// Everything measured in the measured window.
#[derive(Debug)]
pub struct Summary {
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Responses received (and checked) in the window.
    pub completed: u64,
    /// Response payload bytes received in the window.
    pub bytes: u64,
    /// Latency of each response in the window, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Responses per connection in the window.
    pub per_conn: Vec<u64>,
    /// Longest time any connection went without a response in the window.
    pub longest_stall: Duration,
    /// What went wrong.
    pub failures: Failures,
    /// The load generator's own CPU time (user + system) in the window.
    pub cpu: Duration,
    /// Fixed-count run that did not finish in time.
    pub timed_out: bool,
}

impl Summary {
    /// Responses per second.
    pub fn rate(&self) -> f64 {
        per_second(self.completed as f64, self.elapsed)
    }

    /// The load generator's CPU use in cores (1.0 = one core busy all the time).
    pub fn cpu_cores(&self) -> f64 {
        per_second(self.cpu.as_secs_f64(), self.elapsed)
    }

    /// `(min, max)` responses per connection.
    pub fn per_conn_range(&self) -> (u64, u64) {
        let min = self.per_conn.iter().copied().min().unwrap_or(0);
        let max = self.per_conn.iter().copied().max().unwrap_or(0);
        (min, max)
    }

    /// Connections that got no response at all in the window.
    pub fn starved(&self) -> usize {
        self.per_conn.iter().filter(|&&n| n == 0).count()
    }

    /// Latency at `quantile` (0..=1) in nanoseconds; 0 when nothing was recorded.
    pub fn latency_ns(&self, quantile: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(quantile)
        }
    }

    /// The human table: [`RunSettings::header`], then [`Summary::body`].
    pub fn table(&self, s: &RunSettings) -> String {
        s.header() + &self.body(s)
    }

    /// The table without its header: the results.
    pub fn body(&self, s: &RunSettings) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "  requests     {:>12}   {} req/s",
            group(self.completed),
            group(self.rate().round() as u64)
        );
        let _ = writeln!(
            t,
            "  throughput   {:>12}   MB/s of response payload",
            format!("{:.1}", per_second(self.bytes as f64, self.elapsed) / 1e6)
        );
        let _ = writeln!(
            t,
            "  latency us   p50 {}  p99 {}  p99.9 {}  max {}  mean {}",
            micros(self.latency_ns(0.5)),
            micros(self.latency_ns(0.99)),
            micros(self.latency_ns(0.999)),
            micros(self.latency.max()),
            micros(self.latency.mean() as u64)
        );
        let (min, max) = self.per_conn_range();
        let _ = writeln!(
            t,
            "  per conn     min {}  max {}  starved {}  longest stall {} ms",
            group(min),
            group(max),
            self.starved(),
            format_args!("{:.1}", self.longest_stall.as_secs_f64() * 1e3)
        );
        let f = &self.failures;
        let _ = writeln!(
            t,
            "  errors       {}  (mismatches {}, protocol {}, closed {}, io {}, unexpected {}){}",
            f.errors() + f.mismatches,
            f.mismatches,
            f.protocol,
            f.closed,
            f.io,
            f.unexpected,
            if self.timed_out { ", TIMED OUT" } else { "" }
        );
        let _ = writeln!(
            t,
            "  client CPU   {:.2} cores ({:.0}% of the {} thread(s)); at ~1.0 per thread the client is the limit",
            self.cpu_cores(),
            100.0 * self.cpu_cores() / s.threads.max(1) as f64,
            s.threads
        );
        for m in &f.messages {
            let _ = writeln!(t, "  ! {m}");
        }
        t
    }

    /// The JSON object for scripts (latencies in microseconds).
    pub fn json(&self, s: &RunSettings) -> serde_json::Value {
        let (min, max) = self.per_conn_range();
        let f = &self.failures;
        let us = |ns: u64| ns as f64 / 1e3;
        serde_json::json!({
            "addr": s.addr,
            "conns": s.conns,
            "depth": s.depth,
            "size": s.size,
            "threads": s.threads,
            "expect": s.expect,
            "requests_fixed": s.requests,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests": self.completed,
            "rps": self.rate(),
            "bytes_per_s": per_second(self.bytes as f64, self.elapsed),
            "latency_us": {
                "p50": us(self.latency_ns(0.5)),
                "p99": us(self.latency_ns(0.99)),
                "p999": us(self.latency_ns(0.999)),
                "max": us(self.latency.max()),
                "mean": self.latency.mean() / 1e3,
            },
            "per_conn": { "min": min, "max": max, "starved": self.starved(),
                          "longest_stall_ms": self.longest_stall.as_secs_f64() * 1e3 },
            "errors": f.errors(),
            "mismatches": f.mismatches,
            "protocol_errors": f.protocol,
            "closed": f.closed,
            "io_errors": f.io,
            "unexpected": f.unexpected,
            "timed_out": self.timed_out,
            "messages": f.messages,
            "client_cpu_s": self.cpu.as_secs_f64(),
            "client_cpu_cores": self.cpu_cores(),
        })
    }
}

fn per_second(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// `1234567` → `"1,234,567"`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Nanoseconds as microseconds with a precision that suits the magnitude:
/// `1_234` → `"1.23"`, `45_600` → `"45.6"`, `12_345_678` → `"12,346"`.
pub fn micros(ns: u64) -> String {
    let us = ns as f64 / 1e3;
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 1000.0 {
        format!("{us:.1}")
    } else {
        group(us.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_inserts_thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(100_000), "100,000");
    }

    #[test]
    fn micros_precision_follows_magnitude() {
        assert_eq!(micros(0), "0.00");
        assert_eq!(micros(1_234), "1.23");
        assert_eq!(micros(45_600), "45.6");
        assert_eq!(micros(999_949), "999.9");
        assert_eq!(micros(12_345_678), "12,346");
    }

    fn summary(per_conn: Vec<u64>, latencies: &[u64]) -> Summary {
        let mut latency = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for &v in latencies {
            latency.record(v).unwrap();
        }
        Summary {
            elapsed: Duration::from_secs(2),
            completed: per_conn.iter().sum(),
            bytes: 0,
            latency,
            per_conn,
            longest_stall: Duration::ZERO,
            failures: Failures::default(),
            cpu: Duration::from_secs(1),
            timed_out: false,
        }
    }

    #[test]
    fn rates_percentiles_and_fairness() {
        let lat: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let s = summary(vec![10, 0, 30], &lat);
        assert_eq!(s.rate(), 20.0);
        assert_eq!(s.cpu_cores(), 0.5);
        assert_eq!(s.per_conn_range(), (0, 30));
        assert_eq!(s.starved(), 1);
        let p99 = s.latency_ns(0.99);
        assert!((989_000..=991_000).contains(&p99), "{p99}");
        let empty = summary(vec![], &[]);
        assert_eq!(empty.latency_ns(0.99), 0);
        assert_eq!(empty.per_conn_range(), (0, 0));
    }

    #[test]
    fn json_and_table_carry_the_numbers() {
        let s = summary(vec![5, 5], &[2_000, 3_000]);
        let settings = RunSettings {
            addr: "127.0.0.1:1".into(),
            conns: 2,
            depth: 1,
            size: 64,
            threads: 1,
            expect: Expect::Upper,
            warmup: Duration::ZERO,
            requests: None,
            duration: Duration::from_secs(2),
        };
        let j = s.json(&settings);
        assert_eq!(j["requests"], 10);
        assert_eq!(j["expect"], "upper");
        assert_eq!(j["per_conn"]["min"], 5);
        let table = s.table(&settings);
        assert!(table.contains("5 req/s"), "{table}");
    }

    #[test]
    fn failures_merge_and_cap_messages() {
        let mut a = Failures::default();
        for i in 0..4 {
            a.note(format!("a{i}"));
        }
        let mut b = Failures {
            mismatches: 2,
            io: 1,
            ..Failures::default()
        };
        b.note("b0".into());
        b.note("b1".into());
        a.merge(b);
        assert_eq!(a.mismatches, 2);
        assert_eq!(a.errors(), 1);
        assert_eq!(a.messages.len(), 5);
    }
}
