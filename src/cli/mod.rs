//! The operator's commands that work beside the gateway rather than inside it:
//! `postern queue …` ([`queue`], the client of the admin socket, or the spool read offline)
//! and `postern route …` ([`route`], the routing map explained or compared, offline).
//!
//! Each command parses its arguments (clap), does its work and writes what the operator
//! reads; failures are typed errors whose Display is the operator's line. They sit at the
//! top of the layering beside `gateway`: they may use any module, and none uses them.

pub mod queue;
pub mod route;
