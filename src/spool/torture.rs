//! The crash-test load (`postern spool-torture`) and the crash-cycle checker.
