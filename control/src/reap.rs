//! Freeing large values off the thread that has better things to do.
//!
//! Dropping a cluster's worth of objects (a `Manifests` of 10,000 pods, a snapshot) takes
//! milliseconds of `free`. The control thread replaces both on every update; dropping the old
//! ones in place would put that time between one update and the next. A [`Reaper`] hands them
//! to a thread of its own that only drops what it receives.

use std::any::Any;
use std::thread::JoinHandle;

/// A thread that drops the values it is given.
#[derive(Debug)]
pub struct Reaper {
    tx: Option<crossbeam_channel::Sender<Box<dyn Any + Send>>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts the thread, named `name`.
    pub fn spawn(name: &str) -> std::io::Result<Reaper> {
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn Any + Send>>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for value in rx {
                    drop(value);
                }
            })?;
        Ok(Reaper {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Drops `value` on the reaper's thread (in place if that thread is gone).
    pub fn drop_later<T: Send + 'static>(&self, value: T) {
        if let Some(tx) = &self.tx {
            // A send fails only when the thread has ended; the value then comes back and is
            // dropped here.
            let _ = tx.send(Box::new(value));
        }
    }
}

impl Drop for Reaper {
    /// Waits for everything handed over to be dropped.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    #[test]
    fn values_are_dropped_on_the_reaper_thread() {
        struct Probe(Arc<Mutex<Option<ThreadId>>>);
        impl Drop for Probe {
            fn drop(&mut self) {
                *self.0.lock().unwrap() = Some(std::thread::current().id());
            }
        }
        let dropped_on = Arc::new(Mutex::new(None));
        let reaper = Reaper::spawn("test-reaper").expect("spawn");
        reaper.drop_later(Probe(Arc::clone(&dropped_on)));
        drop(reaper);
        let on = *dropped_on.lock().unwrap();
        assert!(
            on.is_some_and(|t| t != std::thread::current().id()),
            "{on:?}"
        );
    }
}
