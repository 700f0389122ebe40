//! The reload machinery itself (issue 11, section 4), tried as a hostile
//! user would: a reload whose plugin check is slow must not hold up the
//! master; old workers that ignore SIGTERM are killed once their drain time
//! is up; reloads queue (and coalesce) instead of piling up generations of
//! workers or being ignored; `[admin] addr`, `[server] pid_file` and
//! `[log] level` take effect; and `nbnet reload` waits for the outcome of
//! its reload and exits non-zero with the master's reason.
//!
//! The hostile C plugin (`plugins/testing/c/hostile.c`) plays the slow or
//! stubborn plugin: `init_sleep_ms`, `catch_term`, `init_exit`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{describe, one_plugin_config, send_signal, wait_until, Server, SIGKILL};

/// One listener serving the hostile plugin, whose `[plugins.config]` lines
/// are `init`, with `[server]` lines `server` and an admin listener.
fn hostile(server: &str, init: &str) -> String {
    format!(
        r#"[server]
{server}

[admin]
addr = "127.0.0.1:{{admin}}"

[[plugins]]
name = "hostile"
path = "{{hostile}}"

[plugins.config]
{init}

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "hostile"
"#
    )
}

/// `GET path` on 127.0.0.1:`port`: the status code and body; `None` if
/// nothing answers within `timeout`.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((code, body.to_string()))
}

/// The value of the sample `series` in a `/metrics` body.
fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Log lines containing `needle`.
fn count(server: &Server, needle: &str) -> usize {
    server.log_count(needle)
}

/// Waits (bounded) until the log has `n` lines containing `needle`.
fn wait_log(server: &Server, needle: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count(server, needle) < n {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {n} log line(s) with {needle:?}\n--- nbnet log ---\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `nbnet reload --config nbnet.toml` in the background (stdout and
/// stderr to files in the sandbox).
fn spawn_reload(server: &mut Server, name: &str) -> Child {
    let dir = server.dir().to_path_buf();
    server
        .sandbox_mut()
        .command()
        .args(["reload", "--config", "nbnet.toml"])
        .stdout(fs::File::create(dir.join(format!("{name}.out"))).unwrap())
        .stderr(fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .expect("spawn nbnet reload")
}

/// Waits (bounded) for a background `nbnet reload`: exit code, stdout, stderr.
fn finish_reload(server: &Server, mut child: Child, name: &str) -> (Option<i32>, String, String) {
    let status = wait_until(Duration::from_secs(20), "nbnet reload to exit", || {
        child.try_wait().expect("try_wait")
    });
    let read = |ext: &str| {
        fs::read_to_string(server.dir().join(format!("{name}.{ext}"))).unwrap_or_default()
    };
    (status.code(), read("out"), read("err"))
}

// ---------------------------------------------- 1. the master never waits

/// A reload whose plugin takes 4 s to initialise: meanwhile both workers
/// are `kill -9`ed. The master must replace them and answer `/healthz`
/// while the new config's plugins are still being checked — before, it sat
/// in the check, so killing the workers then was a full outage until the
/// check was over.
#[test]
fn a_slow_plugin_check_does_not_hold_up_reaping_replacing_or_healthz() {
    let server_section = "workers = 2";
    let mut server = Server::start(&hostile(server_section, ""));
    let admin = server.admin_port();
    let old = server.wait_for_workers(2);

    server
        .sandbox_mut()
        .write_config(&hostile(server_section, "init_sleep_ms = 4000"));
    server.signal(libc::SIGHUP);
    wait_log(&server, "SIGHUP received", 1, Duration::from_secs(10));
    for worker in &old {
        send_signal(worker.pid, SIGKILL);
    }
    // The killed workers are replaced while the check runs (it takes 4 s)…
    // (Not /healthz first: until the master reaps them, the dead workers
    // still count as ready, so an early 200 would prove nothing.)
    let log_when_replaced = wait_until(
        Duration::from_secs(10),
        "replacements of the killed workers",
        || {
            let log = server.log();
            let started = log.lines().filter(|l| l.contains("started (pid")).count();
            (started >= 4).then_some(log)
        },
    );
    assert!(
        !log_when_replaced.contains("reload: starting"),
        "the killed workers were replaced only after the plugin check was over: the master waited on it\n--- nbnet log ---\n{log_when_replaced}"
    );
    // …and /healthz answers meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_when_healthy = loop {
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer 200 within 10 s of the workers being killed\n--- nbnet log ---\n{}",
            server.log()
        );
        if let Some((200, _)) = http_get(admin, "/healthz", Duration::from_secs(10)) {
            break server.log();
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !log_when_healthy.contains("reload: starting"),
        "the master answered /healthz only after the plugin check was over: it waited on it\n--- nbnet log ---\n{log_when_healthy}"
    );
    // The reload itself completes.
    wait_log(&server, "reload complete", 1, Duration::from_secs(20));
    assert_eq!(count(&server, "reload aborted"), 0, "{}", server.log());
}

/// A SIGHUP while a reload is under way was ignored; now it is queued and
/// runs afterwards (with the config as it is then).
#[test]
fn a_sighup_during_a_reload_is_queued_not_ignored() {
    let server_section = "workers = 1";
    let mut server = Server::start(&hostile(server_section, ""));
    server
        .sandbox_mut()
        .write_config(&hostile(server_section, "init_sleep_ms = 1500"));
    server.signal(libc::SIGHUP);
    wait_log(&server, "SIGHUP received", 1, Duration::from_secs(10));
    server
        .sandbox_mut()
        .write_config(&hostile(server_section, "init_sleep_ms = 1"));
    server.signal(libc::SIGHUP);
    wait_log(&server, "SIGHUP received", 2, Duration::from_secs(10));
    wait_log(&server, "reload complete", 2, Duration::from_secs(20));
    let log = server.log();
    assert!(
        log.contains("queued"),
        "the second SIGHUP should have been queued\n{log}"
    );
    assert_eq!(count(&server, "reload aborted"), 0, "{log}");
}

// ------------------------------------ 2. old workers that never finish draining

/// A plugin that catches SIGTERM keeps its worker from ever draining. The
/// master kills such an old worker once `shutdown_timeout` and the grace
/// period are over, logs it with how long it drained and how many
/// connections it had, and counts it — before, they lived on indefinitely.
#[test]
fn old_workers_that_never_finish_stopping_are_killed_when_their_drain_time_is_up() {
    // Old workers hand their connections over and stop by themselves (a
    // plugin catching SIGTERM cannot prevent that any more); one whose
    // plugin's destroy never returns cannot finish (the hung-call watchdog
    // is set to a day, so only the drain deadline can end it). Worker 1
    // only: the plugin check (as worker 0) must get through destroy.
    let server_section = "workers = 2\nshutdown_timeout = \"1s\"\nplugin_timeout = \"1day\"";
    let mut server = Server::start(&hostile(
        server_section,
        "catch_term = true\ndestroy_hang = true\nonly_worker = 1",
    ));
    let admin = server.admin_port();
    let old = server.wait_for_workers(2);
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"ok:hi");

    server.sandbox_mut().write_config(&hostile(
        server_section,
        "catch_term = true\ninit_sleep_ms = 1",
    ));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload complete", 1, Duration::from_secs(15));
    // 1 s of shutdown_timeout + 5 s of grace, and slack for a busy machine.
    wait_until(
        Duration::from_secs(20),
        "the old workers to be gone",
        || old.iter().all(|w| !w.alive()).then_some(()),
    );
    let log = server.log();
    let killed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("after it was told to drain") && l.contains("killing it"))
        .collect();
    assert_eq!(killed.len(), 1, "one line for the old worker killed\n{log}");
    // Its exit is the master's doing, and says so (it was put down to "the
    // OOM killer, or an operator?").
    wait_log(
        &server,
        "killed by the master: still draining past shutdown_timeout = 1s",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(count(&server, "OOM killer"), 0, "{}", server.log());
    let (code, body) = http_get(admin, "/metrics", Duration::from_secs(5)).expect("/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&body, "nbnet_drain_kills_total"), Some(1), "{body}");
    // The new workers serve; the client's connection moved to them.
    assert_eq!(client.request(b"again"), b"ok:again");
}

/// A reload rolled back (a new worker could not start) kills the new
/// workers that are not ready yet; their exits were logged as `killed by
/// SIGKILL (the OOM killer, or an operator?)`. They say the master killed
/// them, and why.
#[test]
fn new_workers_killed_by_a_rollback_are_logged_as_killed_by_the_master() {
    // Two instances of the hostile plugin: in the new config, worker 1's
    // exits in init (the rollback) while worker 2's is still asleep in
    // init (killed). The plugin check loads them as worker 0: it passes.
    let config = |one: &str, two: &str| {
        format!(
            "[server]\nworkers = 3\n\n[[plugins]]\nname = \"one\"\npath = \"{{hostile}}\"\n\n[plugins.config]\n{one}\n\n[[plugins]]\nname = \"two\"\npath = \"{{hostile}}\"\n\n[plugins.config]\n{two}\n\n[[listeners]]\naddr = \"127.0.0.1:{{port}}\"\nplugin = \"one\"\n"
        )
    };
    let mut server = Server::start(&config("", ""));
    server.wait_for_workers(3);
    server.sandbox_mut().write_config(&config(
        "only_worker = 1\ninit_exit = 3",
        "only_worker = 2\ninit_sleep_ms = 60000",
    ));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload rolled back", 1, Duration::from_secs(15));
    let line = server.wait_for_log_line(&[
        "new worker 2 (pid",
        "killed by the master: the reload that started it was rolled back before it was ready",
    ]);
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(count(&server, "OOM killer"), 0, "{}", server.log());
    assert_eq!(server.client().request(b"still"), b"ok:still");
}

/// Clients, one on each of `n` workers, each owed an answer it does not
/// read: their workers cannot hand them over, and stay.
fn stuck_client_on_each_worker(server: &Server, n: usize) -> Vec<nbnet_tests::Client> {
    server
        .clients_on_distinct_workers(n)
        .into_iter()
        .map(|(_, mut client)| {
            client.owe_an_answer();
            client
        })
        .collect()
}

// ------------------------------------------- 3. bounded generations, queued reloads

/// Old workers that never finish draining (each holds a client stopped in
/// the middle of a frame): after two
/// reloads, two old generations are draining, so a third reload waits —
/// `nbnet reload` says it is queued — and further SIGHUPs join it; once an
/// old generation is gone it runs, once. Before, every SIGHUP started one
/// more generation beside all the others (200 workers and ten reloads ran
/// the 1 024-entry scoreboard out).
#[test]
fn reloads_beyond_two_draining_generations_are_queued_and_coalesced() {
    let server_section = "workers = 1\nshutdown_timeout = \"60s\"\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&hostile(server_section, "catch_term = true"));
    let first = server.wait_for_workers(1);
    let mut stuck = Vec::new();
    for n in 1..=2 {
        stuck.extend(stuck_client_on_each_worker(&server, 1));
        server.signal(libc::SIGHUP);
        wait_log(&server, "reload complete", n, Duration::from_secs(15));
    }
    stuck.extend(stuck_client_on_each_worker(&server, 1));
    let reload = spawn_reload(&mut server, "third");
    wait_log(&server, "queued", 1, Duration::from_secs(10));
    server.signal(libc::SIGHUP);
    wait_log(&server, "joins it", 1, Duration::from_secs(10));
    server.signal(libc::SIGHUP);
    wait_log(&server, "joins it", 2, Duration::from_secs(10));
    assert_eq!(
        server.live_workers().len(),
        3,
        "the serving worker and two old generations\n{}",
        server.log()
    );
    assert_eq!(count(&server, "reload complete"), 2, "{}", server.log());

    // The oldest generation goes: the queued reload runs, once.
    send_signal(first[0].pid, SIGKILL);
    let (code, stdout, stderr) = finish_reload(&server, reload, "third");
    assert_eq!(code, Some(0), "nbnet reload: {stdout}{stderr}");
    assert!(
        stdout.contains("queued") && stdout.contains("reload complete"),
        "nbnet reload should say it was queued, then that it completed: {stdout:?}"
    );
    wait_log(&server, "reload complete", 3, Duration::from_secs(15));
    let log = server.log();
    assert!(
        !log.contains("reload 4"),
        "the SIGHUPs that joined the queued reload must not start another\n{log}"
    );
    assert_eq!(server.live_workers().len(), 3, "{log}");
}

/// The scoreboard is sized at startup (twice the workers, at least 8 per
/// generation): a reload asking for more workers than that is refused with
/// a message saying a restart is needed, rather than running out of
/// entries later.
#[test]
fn a_reload_asking_for_more_workers_than_the_scoreboard_holds_is_refused() {
    let mut server = Server::start(&hostile("workers = 1\npid_file = \"nbnet.pid\"", ""));
    server
        .sandbox_mut()
        .write_config(&hostile("workers = 9\npid_file = \"nbnet.pid\"", ""));
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nbnet reload: {}\n{}{}",
        describe(&out.status),
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("workers = 9") && out.stderr.contains("restart"),
        "{}",
        out.stderr
    );
    assert_eq!(server.live_workers().len(), 1, "{}", server.log());
}

// ------------------------------------------------- 4. every key takes effect

/// `[admin] addr` moves with a reload (it used to be ignored while the log
/// said `reload complete`).
#[test]
fn a_reload_moves_the_admin_listener() {
    let server_section = "workers = 1\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&hostile(server_section, ""));
    let old_admin = server.admin_port();
    assert_eq!(
        http_get(old_admin, "/healthz", Duration::from_secs(5)).map(|r| r.0),
        Some(200)
    );
    let moved = hostile(server_section, "").replace("{admin}", "{port2}");
    server.sandbox_mut().write_config(&moved);
    let new_admin = server.sandbox_mut().port(1);
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        http_get(new_admin, "/healthz", Duration::from_secs(5)).map(|r| r.0),
        Some(200),
        "the new admin address should answer\n{}",
        server.log()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", old_admin)).is_err(),
        "the old admin address should be closed\n{}",
        server.log()
    );
}

/// A reload whose new admin address cannot be bound is refused, naming it.
#[test]
fn a_reload_to_an_admin_address_in_use_is_refused() {
    let server_section = "workers = 1\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&hostile(server_section, ""));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let moved = hostile(server_section, "").replace("{admin}", &port.to_string());
    server.sandbox_mut().write_config(&moved);
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("[admin] addr") && out.stderr.contains(&port.to_string()),
        "{}",
        out.stderr
    );
    assert_eq!(
        http_get(server.admin_port(), "/healthz", Duration::from_secs(5)).map(|r| r.0),
        Some(200),
        "the old admin address still serves"
    );
}

/// `[server] pid_file` moves with a reload, so that `nbnet stop` with the
/// new config finds the master (it used to stay at the old path).
#[test]
fn a_reload_moves_the_pid_file() {
    let mut server = Server::start(&hostile("workers = 1\npid_file = \"a.pid\"", ""));
    let (a, b) = (server.dir().join("a.pid"), server.dir().join("b.pid"));
    assert!(a.exists());
    server
        .sandbox_mut()
        .write_config(&hostile("workers = 1\npid_file = \"b.pid\"", ""));
    // The new config names b.pid, which does not exist yet: signal by hand.
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload complete", 1, Duration::from_secs(15));
    let text =
        fs::read_to_string(&b).unwrap_or_else(|e| panic!("{}: {e}\n{}", b.display(), server.log()));
    assert_eq!(text.trim(), server.pid().to_string());
    assert!(!a.exists(), "the old pid file should be gone");
    assert!(server.dir().join("b.pid.reload").exists());
    assert!(!server.dir().join("a.pid.reload").exists());

    let mut stop = server
        .sandbox_mut()
        .command()
        .args(["stop", "--config", "nbnet.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbnet stop");
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "nbnet stop should stop the master through b.pid\n{}",
        server.log()
    );
    let out = wait_until(Duration::from_secs(10), "nbnet stop to exit", || {
        stop.try_wait().expect("try_wait")
    });
    assert!(out.success());
    assert!(!b.exists());
}

/// `[log] level` changes with a reload: from `info` to `debug`, the new
/// workers' debug lines appear.
#[test]
fn a_reload_changes_the_log_level() {
    let server_section = |level: &str| format!("workers = 1\n\n[log]\nlevel = \"{level}\"");
    let mut server = Server::start(&hostile(&server_section("info"), ""));
    assert_eq!(count(&server, " DEBUG "), 0, "{}", server.log());
    server
        .sandbox_mut()
        .write_config(&hostile(&server_section("debug"), ""));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload complete", 1, Duration::from_secs(15));
    let mut client = server.client();
    assert_eq!(client.request(b"x"), b"ok:x");
    wait_log(&server, " DEBUG ", 1, Duration::from_secs(10));
}

/// The `mode` of a Unix listener whose socket a reload keeps changes too.
#[test]
fn a_reload_changes_a_kept_unix_sockets_mode() {
    use std::os::unix::fs::PermissionsExt;
    let with_mode = |mode: &str| {
        hostile("workers = 1", "")
            + &format!(
                "\n[[listeners]]\naddr = \"unix:{{dir}}/s.sock\"\nplugin = \"hostile\"\nmode = \"{mode}\"\n"
            )
    };
    let mut server = Server::start(&with_mode("0600"));
    let socket = server.dir().join("s.sock");
    let mode = |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    server.sandbox_mut().write_config(&with_mode("0660"));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload complete", 1, Duration::from_secs(15));
    assert_eq!(mode(&socket), 0o660, "{}", server.log());
}

/// A reload that changed `[log] file` reported success and changed
/// nothing (the server logged on to the old file). It is refused now,
/// naming the key and what to do, and `nbnet reload` exits 1 with that.
#[test]
fn a_reload_changing_the_log_file_is_refused_naming_it() {
    let section =
        |file: &str| format!("workers = 1\npid_file = \"nbnet.pid\"\n\n[log]\nfile = \"{file}\"");
    let mut server = Server::start(&hostile(&section("nb.log"), ""));
    let (log, other) = (server.dir().join("nb.log"), server.dir().join("other.log"));
    server
        .sandbox_mut()
        .write_config(&hostile(&section("other.log"), ""));
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("reload refused")
            && out
                .stderr
                .contains("[log] file cannot change without a restart (")
            && out.stderr.contains("nbnet.toml:6)")
            && out.stderr.contains("restart nbnet"),
        "{}",
        out.stderr
    );
    assert!(!other.exists(), "nothing should have opened other.log");
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("reload aborted: [log] file cannot change"),
        "{text}"
    );
    // The same file, written another way, is no change: the reload goes.
    server
        .sandbox_mut()
        .write_config(&hostile(&section("./x/../nb.log"), "init_sleep_ms = 1"));
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(server.client().request(b"x"), b"ok:x");
}

// ---------------------------------------------- 5. `nbnet reload` waits

/// `nbnet reload` reports the outcome of its reload: 0 when the new config
/// serves; non-zero with the master's reason when the master refused it
/// (a plugin whose init fails, a listener address in use) or rolled it back
/// (a new worker that could not start). It used to print `reload requested`
/// and exit 0 whatever happened.
#[test]
fn nbnet_reload_waits_for_the_outcome_and_reports_the_masters_reason() {
    let server_section = "workers = 2\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&hostile(server_section, ""));
    let reload = |server: &mut Server, init: &str, extra: &str| {
        let text = hostile(server_section, init) + extra;
        server.sandbox_mut().write_config(&text);
        server
            .sandbox_mut()
            .run(&["reload", "--config", "nbnet.toml"])
    };

    // The plugin check fails: refused, exit 4, with the plugin's words.
    let out = reload(&mut server, "init_error = \"no database\"", "");
    assert_eq!(out.status.code(), Some(4), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("reload refused") && out.stderr.contains("no database"),
        "{}",
        out.stderr
    );

    // A good one: exit 0.
    let out = reload(&mut server, "init_sleep_ms = 1", "");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("reload complete"), "{}", out.stdout);

    // A new listener whose address is taken: refused, naming it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let extra = format!("\n[[listeners]]\naddr = \"127.0.0.1:{port}\"\nplugin = \"hostile\"\n");
    let out = reload(&mut server, "", &extra);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("reload refused") && out.stderr.contains(&port.to_string()),
        "{}",
        out.stderr
    );

    // The check passes (it loads as worker 0) but worker 1 cannot start:
    // rolled back.
    let out = reload(&mut server, "only_worker = 1\ninit_exit = 3", "");
    assert_ne!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("rolled back") && out.stderr.contains("failed to start"),
        "{}",
        out.stderr
    );

    // And the server still serves, and still reloads.
    let out = reload(&mut server, "", "");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let mut client = server.client();
    assert_eq!(client.request(b"still"), b"ok:still");
}

/// Hostile pass 6: a Unix socket file removed by hand made its listener
/// unreachable, and `nbnet reload` said "socket kept" as if all was well.
/// It now says the file is gone and what to do.
#[test]
fn a_reload_warns_when_a_unix_listeners_socket_file_is_gone() {
    let server = Server::start(&format!(
        "{}\n[[listeners]]\naddr = \"unix:{{dir}}/gone.sock\"\nplugin = \"upper\"\n",
        one_plugin_config("upper", "{upper}", "workers = 1")
    ));
    std::fs::remove_file(server.dir().join("gone.sock")).unwrap();
    server.signal(libc::SIGHUP);
    let line = server.wait_for_log_line(&["gone.sock: its socket file is gone"]);
    assert!(line.contains("restart nbnet"), "{line}");
}

/// Left by hostile pass 6: a plugin whose init stops its process (SIGSTOP)
/// during a reload's check was reported only at `init_timeout`, as "does
/// its init block?" (the master's reaper does not see stopped children;
/// start-up and `--check` already named the signal). The reload now fails
/// as soon as the checker stops, naming the signal, and the running worker
/// serves on.
#[test]
fn a_reload_whose_plugin_stops_its_checker_fails_naming_the_signal() {
    let server_section = "workers = 1\ninit_timeout = \"1day\"";
    let mut server = Server::start(&hostile(server_section, ""));
    let worker = server.wait_for_workers(1)[0];
    server
        .sandbox_mut()
        .write_config(&hostile(server_section, "init_raise = \"SIGSTOP\""));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload aborted", 1, Duration::from_secs(20));
    let log = server.log();
    assert!(
        log.contains("SIGSTOP") && !log.contains("init_timeout"),
        "{log}"
    );
    assert_eq!(server.live_workers(), vec![worker]);
    let mut client = server.client();
    assert!(!client.request(b"still here").is_empty());
}
