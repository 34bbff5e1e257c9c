//! The `retryq` binary: parses the command line (see [`cli`]), runs the
//! command, prints errors as one line on stderr and exits 0, 1 or 2.

#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if !matches!(args.command, cli::Command::Run) {
        cli::logging::init_quiet();
    }
    match cli::run_command(args) {
        Ok(()) => {}
        Err(err) => {
            eprintln!("retryq: error: {}", cli::one_line(&err));
            std::process::exit(cli::exit_code(&err));
        }
    }
}
