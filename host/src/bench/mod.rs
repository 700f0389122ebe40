//! `nbnet bench`: a closed-loop load generator for the nbnet protocol.
//!
//! # Brief overview
//!
//! - [`payload`]: unique request payloads (connection id + sequence number)
//!   and the check of each response against its own request. Pure.
//! - [`driver`]: one thread's mio reactor over its share of the connections;
//!   keeps `--pipeline` requests in flight per connection.
//! - [`report`]: merging the threads' tallies, the human table and `--json`.
//!
//! Connections are opened (blocking, so an unreachable server is reported at
//! once) before the clock starts, split round-robin across `--threads`
//! threads, then driven for `--warmup` (checked, not counted) plus
//! `--duration`, or until `--requests` responses came back (for tools that
//! need a fixed amount of work, such as callgrind). `--idle` only opens
//! connections and holds them, for memory-per-connection measurements.

pub mod driver;
pub mod payload;
pub mod report;

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::codec::{FrameReader, MAX_DECLARED};
use crate::exit_code;
use crate::{errln, out, outln};
use driver::{Job, Phases, Progress, Tally};
use payload::{Expect, Payloads};
use report::{Failures, RunSettings, Summary};

/// Options of `nbnet bench`.
/// A duration as the config writes one: whole seconds (`30`) or a
/// humantime string (`500ms`, `1m 30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{text} seconds is too long"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write whole seconds like 30, or 500ms, 2s, 1m)"))
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server address, IP:PORT.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub addr: String,
    /// Connections to open.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Requests in flight per connection (1 = strict request/response).
    #[arg(
        long = "pipeline",
        alias = "depth",
        value_name = "DEPTH",
        default_value_t = 1
    )]
    pub pipeline: usize,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured time (after the warm-up), whole seconds (`30`) or with a
    /// unit (`500ms`, `1m`); with --requests, the time limit.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring (responses are checked, not counted); whole
    /// seconds or with a unit.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Load-generator threads (connections are split among them).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// What a correct response is: `upper` (the default config's plugin),
    /// `echo`, or `none` (check the framing only).
    #[arg(long, value_enum, default_value_t = Expect::Upper)]
    pub expect: Expect,
    /// Text put before every payload (e.g. `"GET "` for a key-value
    /// plugin, `"sleep:1 "`); only with `--expect none`, since the answers
    /// are then the plugin's own.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Send exactly this many requests in all (no warm-up), then stop.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Open --conns connections, make one checked request on each, print
    /// `ready N` and hold them open (no traffic) for --duration.
    #[arg(long)]
    pub idle: bool,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// Runs the benchmark; returns the process exit code.
pub fn run(args: &BenchArgs) -> i32 {
    match run_inner(args) {
        Ok(code) => code,
        Err(message) => {
            errln!("nbnet bench: {message}");
            exit_code::FAILURE
        }
    }
}

fn run_inner(args: &BenchArgs) -> Result<i32, String> {
    let addr: SocketAddr = args.addr.parse().map_err(|_| {
        format!(
            "{:?} is not IP:PORT (for example 127.0.0.1:9000)",
            args.addr
        )
    })?;
    if args.conns == 0 || args.pipeline == 0 || args.size == 0 || args.threads == 0 {
        return Err("--conns, --pipeline, --size and --threads must be at least 1".into());
    }
    if args.size as u64 > MAX_DECLARED {
        return Err(format!("--size must be at most {MAX_DECLARED}"));
    }
    if !args.prefix.is_empty() && args.expect != Expect::None {
        return Err("--prefix needs --expect none (the answers are the plugin's own)".into());
    }

    let tls = match args.tls.options()? {
        Some(_) if args.idle => return Err("--idle does not speak TLS (leave out --tls)".into()),
        Some(options) => Some((
            crate::tls::client_config(&options)?,
            crate::tls::server_name(&options, &args.addr)?,
        )),
        None => None,
    };
    raise_fd_limit(args.conns + 64);
    let payloads = Payloads::new(args.size).with_prefix(args.prefix.as_bytes());
    if args.idle {
        return hold_idle(args, addr, &payloads);
    }
    let threads = args.threads.min(args.conns);
    let mut groups: Vec<(Vec<driver::BenchStream>, Vec<u32>)> =
        (0..threads).map(|_| (Vec::new(), Vec::new())).collect();
    for i in 0..args.conns {
        let stream = connect(addr, i)?;
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("connection {i}: {e}"))?;
        let group = &mut groups[i % threads];
        let stream = mio::net::TcpStream::from_std(stream);
        group.0.push(match &tls {
            None => driver::BenchStream::Plain(stream),
            // The handshake runs in the driver, non-blocking, before the
            // first request's answer (its time is in that latency).
            Some((config, name)) => {
                let session = rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(|e| format!("connection {i}: TLS: {e}"))?;
                driver::BenchStream::Tls(Box::new(driver::TlsClient::new(stream, session)))
            }
        });
        group.1.push(i as u32);
    }
    let (warmup, limit) = match args.requests {
        Some(_) => (Duration::ZERO, args.duration),
        None => (args.warmup, args.warmup + args.duration),
    };
    let settings = RunSettings {
        addr: args.addr.clone(),
        conns: args.conns,
        depth: args.pipeline,
        size: args.size,
        threads,
        expect: args.expect,
        warmup,
        requests: args.requests,
        duration: args.duration,
    };
    // What is measured, at once: a long run is not a silent one.
    if !args.json {
        out!("{}", settings.header());
    }
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let phases = Phases {
        measure_from: start + warmup,
        end: start + limit,
    };
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(t, (streams, ids))| {
            let quota = args.requests.map(|n| {
                let t = t as u64;
                n / threads as u64 + u64::from(t < n % threads as u64)
            });
            let job = Job {
                depth: args.pipeline,
                expect: args.expect,
                payloads: payloads.clone(),
                quota,
                phases,
                progress: Arc::clone(&progress),
            };
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || driver::drive(&job, streams, ids))
                .expect("spawn a load-generator thread")
        })
        .collect();
    // The client's own CPU over the measured window.
    let show_progress = std::io::stderr().is_terminal();
    let mut ticker = Ticker::new(start, &progress);
    if show_progress {
        while Instant::now() < phases.measure_from {
            sleep_until(phases.measure_from.min(ticker.next_tick()));
            if Instant::now() < phases.measure_from {
                ticker.tick_if_due(&phases, &handles);
            }
        }
    }
    sleep_until(phases.measure_from);
    // The first measured line comes a whole second into the window.
    ticker.skip_to(Instant::now());
    let cpu_from = own_cpu_time();
    let measured_from = Instant::now();
    if show_progress {
        while !handles.iter().all(|h| h.is_finished()) {
            // Short sleeps: the summary follows the run's end closely.
            std::thread::sleep(Duration::from_millis(50).min(limit));
            ticker.tick_if_due(&phases, &handles);
        }
    }
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().expect("a load-generator thread panicked"))
        .collect();
    let cpu = own_cpu_time().saturating_sub(cpu_from);
    let elapsed = match args.requests {
        Some(_) => measured_from.elapsed(),
        None => args.duration,
    };
    let summary = merge(tallies, elapsed, cpu);
    if args.json {
        outln!("{}", summary.json(&settings));
    } else {
        out!("{}", summary.body(&settings));
    }
    let f = &summary.failures;
    if f.mismatches > 0 || f.errors() > 0 || summary.timed_out || summary.completed == 0 {
        errln!(
            "nbnet bench: FAILED: {} mismatched response(s), {} error(s){}{}",
            f.mismatches,
            f.errors(),
            if summary.timed_out {
                ", the requests did not all complete within --duration"
            } else {
                ""
            },
            if summary.completed == 0 {
                ", no response in the measured window"
            } else {
                ""
            }
        );
        for m in &f.messages {
            errln!("nbnet bench: {m}");
        }
        return Ok(exit_code::FAILURE);
    }
    Ok(exit_code::OK)
}

/// The progress line `nbnet bench` prints on stderr once a second while it
/// runs, when stderr is a terminal (a script or a log gets the summary
/// only): elapsed time, responses and the rate over the last second.
struct Ticker<'a> {
    start: Instant,
    progress: &'a Progress,
    /// Ticks printed so far.
    ticks: u32,
    /// Responses at the previous tick.
    last_completed: u64,
}

impl<'a> Ticker<'a> {
    fn new(start: Instant, progress: &'a Progress) -> Self {
        Ticker {
            start,
            progress,
            ticks: 0,
            last_completed: 0,
        }
    }

    /// No tick for the time up to `now`.
    fn skip_to(&mut self, now: Instant) {
        let secs = now.duration_since(self.start).as_secs();
        self.ticks = u32::try_from(secs).unwrap_or(u32::MAX);
    }

    fn next_tick(&self) -> Instant {
        self.start + Duration::from_secs(u64::from(self.ticks) + 1)
    }

    /// Prints a line if a second has passed since the last one and the
    /// threads still run.
    fn tick_if_due<T>(&mut self, phases: &Phases, handles: &[std::thread::JoinHandle<T>]) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        if now < self.next_tick() || handles.iter().all(|h| h.is_finished()) {
            return;
        }
        // (Late ticks are skipped, not caught up.)
        self.skip_to(now);
        let at = humantime::format_duration(Duration::from_secs(self.ticks.into()));
        let total = humantime::format_duration(phases.end.duration_since(self.start));
        if now < phases.measure_from {
            errln!("nbnet bench: {at} of {total}: warming up");
            return;
        }
        let completed = self.progress.completed.load(Relaxed);
        let failures = self.progress.failures.load(Relaxed);
        errln!(
            "nbnet bench: {at} of {total}: {} responses, {} req/s in the last second, {failures} error(s)",
            report::group(completed),
            report::group(completed - self.last_completed.min(completed))
        );
        self.last_completed = completed;
    }
}

fn merge(tallies: Vec<Tally>, elapsed: Duration, cpu: Duration) -> Summary {
    let mut latency = driver::new_histogram();
    let mut summary = Summary {
        elapsed,
        completed: 0,
        bytes: 0,
        latency: driver::new_histogram(),
        per_conn: Vec::new(),
        longest_stall: Duration::ZERO,
        failures: Failures::default(),
        cpu,
        timed_out: false,
    };
    for t in tallies {
        summary.completed += t.completed;
        summary.bytes += t.bytes;
        latency
            .add(&t.latency)
            .expect("histograms with the same bounds add");
        summary.per_conn.extend(t.per_conn);
        summary.longest_stall = summary.longest_stall.max(t.longest_stall);
        summary.failures.merge(t.failures);
        summary.timed_out |= t.timed_out;
    }
    summary.latency = latency;
    summary
}

fn connect(addr: SocketAddr, i: usize) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        format!("cannot connect to {addr} (connection {i}): {e}; is the server running?")
    })?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("connection {i}: {e}"))?;
    Ok(stream)
}

/// `--idle`: open the connections, one checked round trip on each, hold them.
fn hold_idle(args: &BenchArgs, addr: SocketAddr, payloads: &Payloads) -> Result<i32, String> {
    let mut streams = Vec::with_capacity(args.conns);
    let mut request = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    for i in 0..args.conns {
        let mut stream = connect(addr, i)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("connection {i}: {e}"))?;
        request.clear();
        payloads.encode_request(i as u32, 0, &mut request);
        stream
            .write_all(&request)
            .map_err(|e| format!("connection {i}: write: {e}"))?;
        let mut reader = FrameReader::new(MAX_DECLARED as usize);
        let response = loop {
            if let Some(frame) = reader
                .next_frame()
                .map_err(|e| format!("connection {i}: bad response framing: {e}"))?
            {
                break frame;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Err(format!("connection {i}: closed by the server")),
                Ok(n) => reader.push(&chunk[..n]),
                Err(e) => return Err(format!("connection {i}: read: {e}")),
            }
        };
        if !payloads.check(args.expect, i as u32, 0, &response) {
            return Err(format!("connection {i}: response mismatch"));
        }
        streams.push(stream);
    }
    outln!("ready {}", streams.len());
    std::thread::sleep(args.duration);
    drop(streams);
    Ok(exit_code::OK)
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}

/// This process's user + system CPU time (all threads).
fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raises the soft open-files limit to at least `want` (up to the hard limit).
fn raise_fd_limit(want: usize) {
    // SAFETY: plain rlimit get/set on this process with valid pointers.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = want as libc::rlim_t;
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: `--duration 30` was refused; the config takes bare seconds.
    #[test]
    fn durations_take_bare_seconds_like_the_config_or_a_unit() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 5 "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("3x").unwrap_err().contains("whole seconds"));
        assert!(parse_duration("99999999999999999999999").is_err());
        assert!(parse_duration("").is_err());
    }
}
