//! The process around the threads: the supervisor that runs jobs as threads and
//! reloads them, daemonizing and pidfiles, signals, logging, the thread helper.

pub mod daemon;
pub mod logging;
pub mod signals;
pub mod supervisor;
pub mod thread;
