//! Printing for the command-line tools (`--version`, `--check`, `plugin
//! info|run|new`, `send`, `bench`, `reload`, `stop`) that never panics.
//!
//! `println!` panics ("failed printing to stdout", exit status 101) when
//! stdout cannot be written: `> /dev/full`, or a pipe whose reader has gone
//! (`| head -1`: Rust ignores SIGPIPE, so the write fails with EPIPE instead
//! of ending the process). The tools print with [`outln!`](crate::outln) /
//! [`out!`](crate::out) and [`errln!`](crate::errln) instead, under one rule:
//!
//! - A failed write to stdout ends the command at once with exit status 1
//!   ([`exit_code::FAILURE`]): its output is incomplete, and a script must
//!   not take that for success (a `--check` whose report never arrived, say);
//!   nothing is gained by doing more work whose output is lost. `nbnet plugin
//!   run` stops the same way, after shutting the plugin down.
//! - The reader going away (EPIPE: `| head -1`, `| grep -q`) is not
//!   reported: it stopped reading on purpose, and the standard Unix tools
//!   (ended silently by SIGPIPE) say nothing either. Any other error (ENOSPC,
//!   EIO) is reported on stderr in one line.
//! - A failed write to stderr is ignored: there is nowhere left to report
//!   it, and the exit status still tells the outcome.

use std::fmt;
use std::io::{self, Write};

use crate::exit_code;

/// Like `print!`, but a failed write ends the process (see the module).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::print_or_exit(format_args!($($arg)*))
    };
}

/// Like `println!`, but a failed write ends the process (see the module).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::print_or_exit(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::print_or_exit(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Like `eprintln!`, but a failed write is ignored instead of panicking.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::eprint(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `args` to stdout and flushes; on failure reports it (see
/// [`failed`]) and exits with status 1.
pub fn print_or_exit(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        drop(stdout);
        std::process::exit(failed(&e));
    }
}

/// Reports a failed write to stdout on stderr (unless the reader has gone:
/// EPIPE) and returns the exit status for it, 1.
pub fn failed(e: &io::Error) -> i32 {
    if e.kind() != io::ErrorKind::BrokenPipe {
        eprint(format_args!(
            "nbnet: cannot write to stdout: {e}; the output is incomplete\n"
        ));
    }
    exit_code::FAILURE
}

/// Writes `args` to stderr, ignoring a failure.
pub fn eprint(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}
