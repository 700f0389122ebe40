//! `nbnet`: a pre-forking plugin host for length-framed TCP services.
//!
//! # Brief overview
//!
//! - [`codec`]: the wire format (10 ASCII digits of length, then the payload),
//!   pure, no I/O.
//! - [`config`]: the TOML config, validated with file:line errors.
//! - [`supervisor`]: the master — binds listeners, forks workers, restarts
//!   the ones that die, stops on signals.
//! - [`worker`]: a worker — loads plugins after fork, runs a mio reactor.
//! - [`scoreboard`]: memory shared by master and workers: which plugin is
//!   running where (crash attribution, hung-call watchdog).
//! - [`listener`]: TCP and Unix listening sockets and streams.
//! - [`tls`]: TLS settings, certificate files, rustls configurations.
//! - [`proxy`]: PROXY protocol v1/v2 header parser (pure).
//! - [`plugin`]: the loader for Rust (`abi_stable`) and C (`libloading`) plugins.
//! - [`control`]: `nbnet reload|stop`, signalling a running master.
//! - [`pid_file`]: the master's locked PID file.
//! - [`client`]: `nbnet send`, a one-shot client for users and tests.
//! - [`bench`]: `nbnet bench`, a closed-loop load generator.
//! - [`authoring`]: `nbnet plugin info|run|new`, tools for plugin authors.
//! - [`output`]: printing for the command-line tools that never panics.
//!
//! The binary (`main.rs`) is only the command line and the dispatch to these
//! parts; they are a library so that benchmarks can call them directly.

pub mod access;
pub mod authoring;
pub mod bench;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod exit_code;
pub mod fork_guard;
pub mod handover;
pub mod listener;
pub mod logging;
pub mod orphans;
pub mod output;
pub mod pid_file;
pub mod plugin;
pub mod privileges;
pub mod proxy;
pub mod reload_status;
pub mod scoreboard;
pub mod signals;
pub mod supervisor;
pub mod systemd;
pub mod tls;
pub mod upgrade_status;
pub mod worker;
