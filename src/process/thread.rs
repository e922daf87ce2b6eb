//! Every thread starts here: named after its job, its closure returns `Result`,
//! and an error ends the thread with one log line rather than silently.

use crate::error::{Error, Result};
use std::thread::JoinHandle;

pub fn spawn<F>(name: &str, f: F) -> JoinHandle<Result<()>>
where
    F: FnOnce() -> Result<()> + Send + 'static,
{
    let n = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = f();
            match &r {
                Ok(()) | Err(Error::Stopped) => log::debug!("thread {n} finished"),
                Err(e) => log::error!("{e}"),
            }
            r
        })
        .expect("cannot start a thread")
}
