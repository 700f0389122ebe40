//! The process tree: the master forks the configured number of workers,
//! replaces a worker that dies (up to max_restarts, then exits 5), stops
//! everything cleanly on SIGTERM/SIGINT, and its workers do not outlive it.

use std::time::Duration;

use nbnet_tests::{describe, send_signal, wait_until, Proc, Server, SIGINT, SIGKILL, SIGTERM};

fn config(workers: usize, max_restarts: usize) -> String {
    format!(
        r#"
[server]
workers = {workers}
max_restarts = {max_restarts}

[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "upper"
"#
    )
}

/// Asserts that none of `workers` is alive within 10 s.
fn assert_all_gone(workers: &[Proc], server: &Server) {
    let gone = wait_until_or_none(Duration::from_secs(10), || {
        workers.iter().all(|p| !p.alive())
    });
    assert!(
        gone,
        "workers still alive after 10 s: {:?}\n--- nbnet log ---\n{}",
        alive(workers),
        server.log()
    );
}

fn alive(workers: &[Proc]) -> Vec<i32> {
    workers
        .iter()
        .filter(|p| p.alive())
        .map(|p| p.pid)
        .collect()
}

fn wait_until_or_none(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_master_forks_the_configured_number_of_workers() {
    let server = Server::start(&config(3, 100));
    let workers = server.wait_for_workers(3);
    for w in &workers {
        assert_ne!(w.pid, server.pid());
    }
}

#[test]
fn workers_zero_starts_one_worker_per_cpu() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let server = Server::start(&config(0, 100));
    server.wait_for_workers(cpus);
    assert_eq!(server.client().request(b"hi"), b"HI");
}

#[test]
fn a_killed_worker_is_replaced_and_service_continues() {
    let mut server = Server::start(&config(2, 100));
    let before = server.wait_for_workers(2);
    let victim = before[0];
    send_signal(victim.pid, SIGKILL);

    let after = server.wait_for("a replacement worker", || {
        let live = server.live_workers();
        (live.len() == 2 && !live.contains(&victim)).then_some(live)
    });
    assert!(
        after.contains(&before[1]),
        "the other worker should not have been touched: {before:?} -> {after:?}"
    );
    let replacement = after.iter().find(|p| **p != before[1]).unwrap();
    assert_ne!(replacement.pid, victim.pid);

    for i in 0..20 {
        let mut client = server.client();
        assert_eq!(
            client.request(format!("after kill {i}").as_bytes()),
            format!("AFTER KILL {i}").as_bytes()
        );
    }
    assert!(
        server.wait_exit(Duration::from_millis(10)).is_none(),
        "the master should still be running"
    );
}

#[test]
fn a_worker_killed_by_sigterm_is_replaced_too() {
    let server = Server::start(&config(1, 100));
    let before = server.wait_for_workers(1)[0];
    send_signal(before.pid, SIGTERM);
    server.wait_for("a replacement worker", || {
        let live = server.live_workers();
        (live.len() == 1 && live[0] != before).then_some(())
    });
    assert_eq!(server.client().request(b"hi"), b"HI");
}

#[test]
fn more_worker_deaths_than_max_restarts_make_the_master_exit_with_code_5() {
    let mut server = Server::start(&config(1, 2));
    let mut workers = Vec::new();
    for round in 1..=3 {
        let worker = server.wait_for_workers(1)[0];
        assert!(!workers.contains(&worker), "round {round}: no new worker");
        workers.push(worker);
        send_signal(worker.pid, SIGKILL);
        if round < 3 {
            // Restarts 1 and 2 are within max_restarts = 2.
            server.wait_for(&format!("replacement {round}"), || {
                let live = server.live_workers();
                (live.len() == 1 && live[0] != worker).then_some(())
            });
        }
    }
    let status = server.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| {
        panic!(
            "the master did not exit after the third worker death\n{}",
            server.log()
        )
    });
    assert_eq!(
        status.code(),
        Some(5),
        "expected exit code 5, got {}\n{}",
        describe(&status),
        server.log()
    );
    let seen = server.seen_workers();
    assert_all_gone(&seen, &server);
}

fn assert_clean_stop_on(sig: i32) {
    let mut server = Server::start(&config(2, 100));
    let workers = server.wait_for_workers(2);
    // An open connection must not keep the server from stopping.
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"HI");

    server.signal(sig);
    let status = server.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| {
        panic!(
            "the master did not exit within 10 s of signal {sig}\n{}",
            server.log()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit code 0, got {}\n{}",
        describe(&status),
        server.log()
    );
    // The master reaps its workers before it exits: they are gone, not zombies.
    for w in &workers {
        assert!(
            !w.alive(),
            "worker {} outlived the master\n{}",
            w.pid,
            server.log()
        );
        assert!(
            Proc::of(w.pid) != Some(*w),
            "worker {} was left as a zombie",
            w.pid
        );
    }
}

#[test]
fn sigterm_stops_the_master_and_all_workers_with_exit_code_0() {
    assert_clean_stop_on(SIGTERM);
}

#[test]
fn sigint_stops_the_master_and_all_workers_with_exit_code_0() {
    assert_clean_stop_on(SIGINT);
}

#[test]
fn after_sigterm_the_port_is_closed() {
    let mut server = Server::start(&config(2, 100));
    let port = server.port();
    server.signal(SIGTERM);
    server
        .wait_exit(Duration::from_secs(10))
        .expect("master exits");
    wait_until(Duration::from_secs(5), "the port to be closed", || {
        nbnet_tests::Client::try_connect(port)
            .is_err()
            .then_some(())
    });
}

#[test]
fn workers_die_when_the_master_is_killed() {
    let mut server = Server::start(&config(2, 100));
    let workers = server.wait_for_workers(2);
    server.signal(SIGKILL);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("SIGKILLed master is reaped");
    assert_eq!(describe(&status), "signal 9");
    assert_all_gone(&workers, &server);
}

#[test]
fn without_a_server_section_two_workers_start() {
    let server = Server::start(
        r#"
[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
    server.wait_for_workers(2);
    // And they stay two (no crash loop behind the scenes).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.live_workers().len(), 2);
}

/// Hostile pass 7: SIGSTOP on the only worker stopped all answers, and the
/// master said nothing. It now names the stopped worker, and says when it
/// continues; the worker is not replaced (an operator may stop it on
/// purpose), and serves again after SIGCONT.
#[test]
fn a_stopped_worker_is_named_in_the_log_and_serves_again_after_sigcont() {
    let server = Server::start(&config(1, 100));
    let worker = server.wait_for_workers(1)[0];
    send_signal(worker.pid, libc::SIGSTOP);
    let line = server.wait_for_log_line(&[&format!("worker 0 (pid {}) was stopped", worker.pid)]);
    assert!(
        line.contains("SIGSTOP") && line.contains("SIGCONT"),
        "{line}"
    );
    send_signal(worker.pid, libc::SIGCONT);
    server.wait_for_log_line(&[&format!("worker 0 (pid {}) continues", worker.pid)]);
    assert_eq!(server.client().request(b"again"), b"AGAIN");
    assert_eq!(server.live_workers(), vec![worker]);
}
