//! The `ai-engine` command line: daemon, client commands and model management.

fn main() {
    println!("ai-engine {}", env!("CARGO_PKG_VERSION"));
}
