//! The spool benchmark (`postern bench-spool`).
