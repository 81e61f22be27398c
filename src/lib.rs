//! The `agr` command line's library half: the benchmark.

pub mod bench;
