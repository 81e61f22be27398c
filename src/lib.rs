//! The `agr` command line's library half: the benchmark and the sharded
//! commands.

pub mod bench;
pub mod sharded;
