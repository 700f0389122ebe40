//! Faulty plugins (issue 3): what a panic, a crash (segfault, abort), a hang,
//! a slow call, an error, an oversized answer and a crash loop cost, for the
//! Rust test plugin (`plugins/testing/misbehave-rs`) and the C one
//! (`plugins/testing/c/misbehave.c`) alike: the request or its worker, never
//! the service, and the log says which plugin did what.

use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{one_plugin_config, rss_kib, Client, Proc, Server};

/// The plugin's name in the config, so the log lines can be checked for it.
const RUST: Plugin = Plugin {
    name: "faulty-rs",
    placeholder: "{misbehave_rs}",
};
const C: Plugin = Plugin {
    name: "faulty-c",
    placeholder: "{misbehave}",
};

#[derive(Clone, Copy)]
struct Plugin {
    name: &'static str,
    placeholder: &'static str,
}

/// A config serving `plugin` with `workers` workers and extra `[server]` keys.
fn config(plugin: Plugin, workers: usize, server: &str) -> String {
    one_plugin_config(
        plugin.name,
        plugin.placeholder,
        &format!("workers = {workers}\n{server}"),
    )
}

/// The live worker with this pid.
fn worker(server: &Server, pid: i32) -> Proc {
    server
        .live_workers()
        .into_iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("worker {pid} is not alive\n{}", server.log()))
}

// ---------------------------------------------------------------------- panic

#[test]
fn a_rust_panic_fails_only_that_request_and_the_instance_keeps_its_state() {
    let server = Server::start(&config(RUST, 1, ""));
    let workers = server.wait_for_workers(1);
    let mut bystander = server.client();
    let (pid, calls) = bystander.ok();

    let mut client = server.client();
    assert_eq!(client.worker_pid(), pid, "one worker serves both");
    let _ = client.send_frame(b"panic");
    client.expect_closed();

    // Issue 14: the plugin's own std printed `thread '…' panicked at …`
    // to stderr besides the host's line. Now one line says it, through
    // the host's log, with the plugin's name and where it panicked.
    server.wait_for_log_line(&[
        "plugin failed a request: panicked at plugins/testing/misbehave-rs/src/lib.rs:",
        ": misbehave_rs panics on purpose; connection closed",
        RUST.name,
    ]);
    let log = server.log();
    assert_eq!(
        log.matches("misbehave_rs panics on purpose").count(),
        1,
        "the panic must be told once, in the host's log format:\n{log}"
    );
    assert!(
        !log.contains("thread '"),
        "std's panic hook printed:\n{log}"
    );
    // The same worker, the same instance: its call counter went on
    // (`pid` and `panic` were calls too).
    assert_eq!(bystander.ok(), (pid, calls + 3));
    assert_eq!(server.client().request(b"after"), b"after");
    assert_eq!(
        server.live_workers(),
        workers,
        "a panic must not cost a worker"
    );
    assert!(
        !server.log().contains("died"),
        "no worker may die of a caught panic:\n{}",
        server.log()
    );
}

// ------------------------------------------------------------ segfault, abort

/// With two workers: `request` crashes the worker serving one connection;
/// the connection held on the other worker is untouched, the log names the
/// worker, the signal and the plugin, and a replacement serves soon.
fn a_crash_kills_only_its_worker(plugin: Plugin, request: &[u8], signal: &str) {
    let server = Server::start(&config(plugin, 2, ""));
    server.wait_for_workers(2);
    let mut pair = server.clients_on_distinct_workers(2);
    let (survivor_pid, mut survivor) = pair.pop().unwrap();
    let (victim_pid, mut victim) = pair.pop().unwrap();
    let survivor_proc = worker(&server, survivor_pid);
    let (_, calls) = survivor.ok();

    let _ = victim.send_frame(request);
    victim.expect_closed();
    let crashed = Instant::now();

    let line = server.wait_for_log_line(&[&format!("(pid {victim_pid}) died: killed by {signal}")]);
    // "worker I (pid P) died: killed by SIG... while running plugin "name"; restarting it ..."
    let names_worker = line
        .split("worker ")
        .nth(1)
        .and_then(|rest| rest.split_once(' '))
        .is_some_and(|(index, rest)| {
            index.parse::<usize>().is_ok() && rest.starts_with(&format!("(pid {victim_pid})"))
        });
    assert!(
        names_worker
            && line.contains(&format!("while running plugin \"{}\"", plugin.name))
            && line.contains("restarting it"),
        "the death line must name the worker, the signal and the plugin: {line}"
    );

    // The other worker and its connection noticed nothing.
    assert!(survivor_proc.alive(), "the other worker died too");
    assert_eq!(survivor.ok(), (survivor_pid, calls + 1));

    // A replacement worker serves, soon.
    let replacement = server.wait_for("a replacement worker", || {
        server
            .live_workers()
            .into_iter()
            .find(|p| p.pid != victim_pid && p.pid != survivor_pid)
    });
    let started = crashed.elapsed();
    let mut held = Vec::new();
    let served = loop {
        let mut client = server.client();
        if client.worker_pid() == replacement.pid {
            break crashed.elapsed();
        }
        held.push(client);
        assert!(
            crashed.elapsed() < Duration::from_secs(5),
            "the replacement worker {} did not serve within 5 s of the crash\n{}",
            replacement.pid,
            server.log()
        );
        thread::sleep(Duration::from_millis(2));
    };
    println!(
        "{} {}: replacement worker running {started:?} and serving {served:?} after the crash was seen",
        plugin.name,
        String::from_utf8_lossy(request)
    );
    // (The probes above may have reached the survivor too.)
    still_the_same_instance(&mut survivor, survivor_pid, calls + 1);
}

/// `client`'s worker is still `pid`, with the same plugin instance: its call
/// counter went on past `calls`.
fn still_the_same_instance(client: &mut Client, pid: i32, calls: u64) {
    let (now_pid, now_calls) = client.ok();
    assert_eq!(now_pid, pid, "the connection moved to another worker?");
    assert!(
        now_calls > calls,
        "the call counter went from {calls} to {now_calls}: a new instance?"
    );
}

#[test]
fn a_rust_segfault_kills_only_its_worker_and_is_replaced() {
    a_crash_kills_only_its_worker(RUST, b"segfault", "SIGSEGV");
}

#[test]
fn a_c_segfault_kills_only_its_worker_and_is_replaced() {
    a_crash_kills_only_its_worker(C, b"segfault", "SIGSEGV");
}

#[test]
fn a_rust_abort_kills_only_its_worker_and_is_replaced() {
    a_crash_kills_only_its_worker(RUST, b"abort", "SIGABRT");
}

#[test]
fn a_c_abort_kills_only_its_worker_and_is_replaced() {
    a_crash_kills_only_its_worker(C, b"abort", "SIGABRT");
}

// ----------------------------------------------------------------------- hang

/// With two workers and plugin_timeout = 1s: a hung call's worker is killed
/// by the watchdog and replaced; the other worker serves meanwhile.
fn a_hang_is_killed_by_the_watchdog(plugin: Plugin) {
    let server = Server::start(&config(plugin, 2, r#"plugin_timeout = "1s""#));
    server.wait_for_workers(2);
    let mut pair = server.clients_on_distinct_workers(2);
    let (survivor_pid, mut survivor) = pair.pop().unwrap();
    let (victim_pid, mut victim) = pair.pop().unwrap();
    let (_, calls) = survivor.ok();

    victim.send_frame(b"hang").unwrap();
    let sent = Instant::now();
    // While the call hangs, the other worker serves.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(survivor.ok(), (survivor_pid, calls + 1));

    let closed_after =
        victim.expect_closed_within(Duration::from_secs(10)) + Duration::from_millis(300);
    println!(
        "{}: hung connection closed {closed_after:?} after the request",
        plugin.name
    );
    assert!(
        closed_after >= Duration::from_millis(900),
        "the worker was killed after {closed_after:?}, before plugin_timeout = 1s"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the watchdog took {:?} to kill a call hung past plugin_timeout = 1s",
        sent.elapsed()
    );

    let line = server.wait_for_log_line(&[
        &format!("plugin \"{}\" has not returned for", plugin.name),
        &format!("(pid {victim_pid}), over plugin_timeout = 1s: killing the worker"),
    ]);
    // "... has not returned for 1.2s in worker I (pid P) ...": the elapsed time.
    let elapsed = line
        .split("has not returned for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("");
    assert!(
        elapsed.ends_with('s') && elapsed.starts_with(|c: char| c.is_ascii_digit()),
        "the watchdog line must give the elapsed time: {line}"
    );
    server.wait_for_log_line(&[&format!(
        "(pid {victim_pid}) died: killed by the watchdog: plugin \"{}\" did not return for",
        plugin.name
    )]);

    let replacement = server.wait_for("a replacement worker", || {
        server
            .live_workers()
            .into_iter()
            .find(|p| p.pid != victim_pid && p.pid != survivor_pid)
    });
    server.wait_for("the replacement to serve", || {
        (server.client().worker_pid() == replacement.pid).then_some(())
    });
    still_the_same_instance(&mut survivor, survivor_pid, calls + 1);
}

#[test]
fn a_rust_hang_is_killed_by_the_watchdog_and_replaced() {
    a_hang_is_killed_by_the_watchdog(RUST);
}

#[test]
fn a_c_hang_is_killed_by_the_watchdog_and_replaced() {
    a_hang_is_killed_by_the_watchdog(C);
}

// ---------------------------------------------------------------------- sleep

/// `sleep:200` only delays its answer (well under plugin_timeout).
fn a_slow_call_only_delays(plugin: Plugin) {
    let server = Server::start(&config(plugin, 1, r#"plugin_timeout = "1s""#));
    let workers = server.wait_for_workers(1);
    let mut client = server.client();
    let (pid, calls) = client.ok();
    let start = Instant::now();
    assert_eq!(client.request(b"sleep:200"), b"slept 200");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "answered after {took:?}"
    );
    assert_eq!(
        client.ok(),
        (pid, calls + 2),
        "same connection, same instance"
    );
    assert_eq!(server.live_workers(), workers);
    assert!(
        !server.log().contains("killing the worker"),
        "{}",
        server.log()
    );
}

#[test]
fn a_slow_rust_call_only_delays_its_answer() {
    a_slow_call_only_delays(RUST);
}

#[test]
fn a_slow_c_call_only_delays_its_answer() {
    a_slow_call_only_delays(C);
}

// ---------------------------------------------------------------------- error

fn an_error_is_logged_and_closes_that_connection(plugin: Plugin, message: &str) {
    let server = Server::start(&config(plugin, 1, ""));
    let workers = server.wait_for_workers(1);
    let mut bystander = server.client();
    let (pid, calls) = bystander.ok();

    let mut client = server.client();
    let _ = client.send_frame(b"error");
    client.expect_closed();
    let line = server.wait_for_log_line(&[&format!(
        "plugin failed a request: {message}; connection closed"
    )]);
    assert!(
        line.contains(plugin.name),
        "the line must name the plugin {:?}: {line}",
        plugin.name
    );
    assert_eq!(bystander.ok(), (pid, calls + 2));
    assert_eq!(server.live_workers(), workers);
}

#[test]
fn a_rust_error_is_logged_with_the_plugin_name_and_closes_that_connection() {
    an_error_is_logged_and_closes_that_connection(RUST, "misbehave_rs refuses on purpose");
}

#[test]
fn a_c_error_is_logged_with_the_plugin_name_and_closes_that_connection() {
    an_error_is_logged_and_closes_that_connection(C, "misbehave refuses on purpose");
}

// ----------------------------------------------------------------------- huge

/// Bound on a worker's resident memory after oversized answers (default
/// max_frame_bytes = 16 MiB, so one response buffer may reach 16 MiB).
const RSS_BOUND_KIB: u64 = 64 * 1024;

fn an_oversized_answer_is_refused(plugin: Plugin) {
    let server = Server::start(&config(plugin, 1, ""));
    let workers = server.wait_for_workers(1);
    let pid = workers[0].pid;
    let mut bystander = server.client();
    let (_, calls) = bystander.ok();
    let before = rss_kib(pid).expect("worker RSS");

    const ROUNDS: u64 = 5;
    for _ in 0..ROUNDS {
        let mut client = server.client();
        let _ = client.send_frame(b"huge");
        client.expect_closed();
    }
    let line = server.wait_for_log_line(&[
        "the response would exceed max_frame_bytes = 16777216; the host refused it",
    ]);
    assert!(
        line.contains(plugin.name),
        "the line must name the plugin: {line}"
    );
    assert_eq!(
        server.log_count("the host refused it"),
        ROUNDS as usize,
        "one refusal per huge request"
    );

    let after = rss_kib(pid).expect("worker RSS");
    println!(
        "{}: worker RSS {before} KiB before, {after} KiB after {ROUNDS} refused huge answers",
        plugin.name
    );
    assert!(
        after < RSS_BOUND_KIB,
        "worker RSS grew to {after} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    assert_eq!(bystander.ok(), (pid, calls + ROUNDS + 1));
    assert_eq!(server.live_workers(), workers);
}

#[test]
fn a_rust_answer_over_max_frame_bytes_is_refused_and_memory_stays_bounded() {
    an_oversized_answer_is_refused(RUST);
}

#[test]
fn a_c_answer_over_max_frame_bytes_is_refused_and_memory_stays_bounded() {
    an_oversized_answer_is_refused(C);
}

// ----------------------------------------------------------------- crash loops

/// Keeps sending `segfault` from `threads` threads for `run`, each on a fresh
/// connection given up after 50 ms; returns how many were sent.
fn hammer(server: &Server, threads: usize, run: Duration) -> usize {
    let port = server.port();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let end = Instant::now() + run;
                let mut sent = 0;
                while Instant::now() < end {
                    let Ok(mut client) = Client::try_connect(port) else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    if client.send_frame(b"segfault").is_ok() {
                        sent += 1;
                    }
                    client.set_read_timeout(Duration::from_millis(50));
                    let _ = client.read_frame();
                }
                sent
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// Worker deaths in the log (at debug level every death has a line).
fn deaths(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains(") died: ") || l.contains(") died again: ") || l.contains("crash loop:")
        })
        .count()
}

#[test]
fn a_crash_loop_backs_off_and_is_reported_in_one_line() {
    let template = config(
        RUST,
        1,
        r#"max_restarts = 1000

[log]
level = "debug""#,
    );
    let server = Server::start(&template);
    server.wait_for_workers(1);
    let run = Duration::from_secs(3);
    let sent = hammer(&server, 4, run);
    let log = server.log();
    let died = deaths(&log);
    println!("crash loop: {sent} segfault requests sent in {run:?}, {died} worker deaths");
    assert!(
        died >= 3,
        "the hammering should crash the worker repeatedly:\n{log}"
    );
    assert_eq!(
        server.log_count("crash loop: worker 0 died 3 times in a row"),
        1,
        "exactly one crash-loop line:\n{log}"
    );
    // Restarts back off (0, 100 ms, 200 ms, 400 ms, ...): in 3 s at most
    // about 6 restarts, however many crashing requests arrive.
    assert!(
        died <= 10,
        "{died} worker deaths in {run:?}: the restarts do not back off"
    );
    assert!(
        sent >= 5 * died,
        "only {sent} requests for {died} deaths: the hammer did not hammer"
    );
    assert!(
        !log.contains("giving up"),
        "max_restarts = 1000 was not reached:\n{log}"
    );
}

#[test]
fn a_crash_loop_past_max_restarts_in_the_window_makes_the_master_give_up_with_exit_5() {
    let mut server = Server::start(&config(
        C,
        1,
        r#"max_restarts = 3
restart_window = "60s""#,
    ));
    server.wait_for_workers(1);
    let port = server.port();
    let hammering = thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match Client::try_connect(port) {
                Ok(mut client) => {
                    let _ = client.send_frame(b"segfault");
                    client.set_read_timeout(Duration::from_millis(50));
                    let _ = client.read_frame();
                }
                // The master gave up: nobody listens any more.
                Err(_) => break,
            }
        }
    });
    let status = server.wait_exit(Duration::from_secs(15));
    hammering.join().unwrap();
    let log = server.log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(5),
        "the master should give up with exit code 5, got {status:?}\n{log}"
    );
    assert_eq!(server.log_count("crash loop:"), 1, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("giving up and stopping"))
        .unwrap_or_else(|| panic!("no giving-up line:\n{log}"));
    assert!(
        line.contains("killed by SIGSEGV") && line.contains("max_restarts = 3"),
        "{line}"
    );
}

#[test]
fn rare_crashes_spaced_wider_than_restart_window_never_make_the_master_give_up() {
    let server = Server::start(&config(
        RUST,
        1,
        r#"max_restarts = 3
restart_window = "1s"

[log]
level = "debug""#,
    ));
    let mut last_crash: Option<Instant> = None;
    for round in 1..=4 {
        // The current worker (a replacement after the first round).
        let mut client = server.wait_for("a worker that serves", || {
            let mut client = Client::try_connect(server.port()).ok()?;
            client.set_read_timeout(Duration::from_secs(2));
            client.send_frame(b"pid").ok()?;
            client.read_frame().ok()?;
            client.set_read_timeout(nbnet_tests::IO_TIMEOUT);
            Some(client)
        });
        if let Some(at) = last_crash {
            let spacing = Duration::from_millis(1300);
            if at.elapsed() < spacing {
                thread::sleep(spacing - at.elapsed());
            }
        }
        let _ = client.send_frame(b"segfault");
        client.expect_closed();
        last_crash = Some(Instant::now());
        server.wait_for(&format!("death {round} in the log"), || {
            (deaths(&server.log()) >= round).then_some(())
        });
    }
    // The fourth replacement serves, and the master is still there.
    let answer = server.wait_for("the fourth replacement to serve", || {
        let mut client = Client::try_connect(server.port()).ok()?;
        client.set_read_timeout(Duration::from_secs(2));
        client.send_frame(b"still here").ok()?;
        client.read_frame().ok()
    });
    assert_eq!(answer, b"still here");
    let log = server.log();
    assert!(!log.contains("giving up"), "{log}");
    assert_eq!(server.live_workers().len(), 1);
}
