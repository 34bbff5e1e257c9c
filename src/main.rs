//! The `retryq` binary: parses the command line (see [`cli`]), runs the
//! command, prints errors as one line on stderr and exits 0, 1 or 2.

#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

fn main() {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            // One line, like every other error; --help has the details.
            let text = e.to_string();
            let summary: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            let summary = summary.join(" ");
            let summary = summary.trim_start_matches("error: ");
            eprintln!("retryq: error: {summary} (see `retryq --help`)");
            std::process::exit(2);
        }
        // --help and --version print to stdout and exit 0.
        Err(e) => e.exit(),
    };
    // The plugin host forwards its logs to the daemon over its own pipe.
    if !matches!(
        args.command,
        cli::Command::Run | cli::Command::PluginHost { .. }
    ) {
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
