//! Commented sample configs printed by `--ini` (and shipped under scripts/conf).

pub const TICKER_INI: &str = include_str!("../scripts/conf/ticker.ini");
pub const WORKER_INI: &str = include_str!("../scripts/conf/worker.ini");
