//! The command-line contract: exit codes, outputs and error texts, one module per command (and
//! one for untrusted input), in one test binary.

mod common;
mod eval;
mod hub;
mod invert;
mod sample;
mod samplers;
mod schedule;
mod serve;
mod train;
mod untrusted;
