//! PostgreSQL fleet benchmark: the shared store against SQLite, and one,
//! two and three daemons draining one queue, measured in one run so the
//! ratios mean something. Run with `cargo bench --bench postgres`.
//!
//! Skeleton: the measurements land in the following commits.

fn main() {
    println!("postgres bench: not measured yet");
}
