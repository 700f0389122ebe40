//! `nbnet bench`: a closed-loop load generator for the nbnet protocol.

use clap::Args;

/// Options of `nbnet bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server address, IP:PORT.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub addr: String,
}

/// Runs the benchmark; returns the process exit code.
pub fn run(args: &BenchArgs) -> i32 {
    eprintln!("nbnet bench: not implemented yet ({})", args.addr);
    crate::exit_code::FAILURE
}
