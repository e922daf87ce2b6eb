//! Signals become messages: a signal-hook thread turns HUP, INT and TERM into
//! `Control` values on a crossbeam channel, which the supervisor passes to every
//! job. Meanings are Skytools': HUP reload, INT stop after the current batch,
//! TERM stop now (safely); a second INT or TERM exits at once.

use crossbeam_channel::{Receiver, Sender, unbounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Reload,
    /// Finish the current batch, then stop.
    Stop,
    /// Stop as soon as it is safe (the open transaction is rolled back).
    Kill,
}

/// Starts the signal thread; returns the channel it feeds.
pub fn listen() -> std::io::Result<Receiver<Control>> {
    let (tx, rx): (Sender<Control>, Receiver<Control>) = unbounded();
    let mut signals = Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopping = false;
            for sig in signals.forever() {
                let msg = match sig {
                    SIGHUP => Control::Reload,
                    SIGINT | SIGTERM if stopping => {
                        log::warn!("second stop signal: exiting at once");
                        std::process::exit(0);
                    }
                    SIGINT => {
                        log::info!("got SIGINT, stopping after the current batch");
                        stopping = true;
                        Control::Stop
                    }
                    _ => {
                        log::info!("got SIGTERM, stopping");
                        stopping = true;
                        Control::Kill
                    }
                };
                if sig == SIGHUP {
                    log::info!("got SIGHUP, reloading config and reopening the log");
                }
                if tx.send(msg).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
