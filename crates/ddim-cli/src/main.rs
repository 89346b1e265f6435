//! The `ddim` command line.

fn main() {}
