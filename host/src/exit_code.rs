//! Named exit codes of the `nbnet` process and of its workers.
//!
//! The master reads a worker's exit code to decide between restarting it and
//! halting (a worker that cannot load its plugins would fail the same way
//! again: restarting it would only loop), as gunicorn's arbiter does.

/// Clean stop (SIGTERM/SIGINT), or `--check` found nothing wrong.
pub const OK: i32 = 0;
/// Any other failure (for example a listener that cannot be bound).
pub const FAILURE: i32 = 1;
/// The command line is wrong (clap's own code for usage errors).
pub const USAGE: i32 = 2;
/// The config file is missing or invalid.
pub const CONFIG_INVALID: i32 = 3;
/// A plugin could not be loaded or its init failed (master or worker).
pub const PLUGIN_LOAD_FAILED: i32 = 4;
/// Workers died more than `max_restarts` times: the master gave up.
pub const TOO_MANY_RESTARTS: i32 = 5;
