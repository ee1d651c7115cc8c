//! Freeing large values off the thread that has better things to do.
//!
//! Dropping a cluster's worth of objects (a `Manifests` of 10,000 pods, a snapshot) takes
//! milliseconds of `free`. The control thread replaces both on every update; dropping the old
//! ones in place would put that time between one update and the next. A [`Reaper`] hands them
//! to a thread of its own that only drops what it receives.
//!
//! A replaced snapshot may still be held by a worker (for the burst it is classifying) when
//! it reaches the reaper; dropping the reaper's reference then would leave the last one, and
//! the milliseconds of `free`, to the worker. [`Reaper::drop_shared_later`] keeps such a value
//! until the reaper's reference is the only one, so a worker only ever decrements a count.

use std::any::Any;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

/// How often the reaper looks again at shared values others still hold. A worker holds a
/// snapshot for one burst (microseconds), so the first look usually finds it free.
const RECHECK: Duration = Duration::from_millis(1);

/// A value waiting for the reaper's reference to be its last.
trait Shared: Send {
    /// Whether no one else holds the value.
    fn sole(&self) -> bool;
}

impl<T: Send + Sync> Shared for Arc<T> {
    fn sole(&self) -> bool {
        // Only the reaper can make a new reference from this one (the publisher handed it
        // over), so once the count is 1 it stays 1 until the reaper drops it.
        Arc::strong_count(self) == 1
    }
}

enum Job {
    Now(Box<dyn Any + Send>),
    Shared(Box<dyn Shared>),
}

/// A thread that drops the values it is given.
#[derive(Debug)]
pub struct Reaper {
    tx: Option<crossbeam_channel::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Now(_) => "Now",
            Job::Shared(_) => "Shared",
        })
    }
}

impl Reaper {
    /// Starts the thread, named `name`.
    pub fn spawn(name: &str) -> std::io::Result<Reaper> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || reap(&rx))?;
        Ok(Reaper {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Drops `value` on the reaper's thread (in place if that thread is gone).
    pub fn drop_later<T: Send + 'static>(&self, value: T) {
        self.send(Job::Now(Box::new(value)));
    }

    /// Drops this reference to `value` on the reaper's thread once no other thread holds
    /// one, so that the value is freed there (the reaper looks again every millisecond while
    /// others hold it). When the reaper stops, values still held elsewhere are left to their
    /// last holder.
    pub fn drop_shared_later<T: Send + Sync + 'static>(&self, value: Arc<T>) {
        self.send(Job::Shared(Box::new(value)));
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // A send fails only when the thread has ended; the value then comes back and is
            // dropped here.
            let _ = tx.send(job);
        }
    }
}

/// The reaper thread: drops what it receives, and shared values once they are its alone.
fn reap(rx: &crossbeam_channel::Receiver<Job>) {
    let mut held: Vec<Box<dyn Shared>> = Vec::new();
    loop {
        let job = if held.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(RECHECK)
        };
        match job {
            Ok(Job::Now(value)) => drop(value),
            Ok(Job::Shared(value)) => held.push(value),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // Dropping the values `retain` removes frees them here.
        held.retain(|v| !v.sole());
    }
}

impl Drop for Reaper {
    /// Waits for everything handed over to be dropped (shared values still held elsewhere:
    /// this reference).
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

    struct Probe(Arc<Mutex<Option<ThreadId>>>);
    impl Drop for Probe {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    /// A value published through an `ArcSwap`, as the agent publishes snapshots, and still
    /// held by a worker's guard when it is swapped out and handed to the reaper, is freed on
    /// the reaper's thread after the worker lets go, not by the worker.
    #[test]
    fn a_swapped_out_value_a_worker_still_holds_is_freed_on_the_reaper_thread() {
        let dropped_on = Arc::new(Mutex::new(None));
        let reaper = Reaper::spawn("test-reaper").expect("spawn");
        let published = Arc::new(arc_swap::ArcSwap::from_pointee(Probe(Arc::clone(
            &dropped_on,
        ))));
        let (loaded_tx, loaded_rx) = crossbeam_channel::bounded::<()>(0);
        let (swapped_tx, swapped_rx) = crossbeam_channel::bounded::<()>(0);
        let worker = {
            let published = Arc::clone(&published);
            std::thread::spawn(move || {
                let guard = published.load();
                loaded_tx.send(()).unwrap();
                swapped_rx.recv().unwrap();
                // Holds the old value while the reaper gets it and looks at it.
                std::thread::sleep(Duration::from_millis(20));
                drop(guard);
                std::thread::current().id()
            })
        };
        loaded_rx.recv().unwrap();
        let old = published.swap(Arc::new(Probe(Arc::new(Mutex::new(None)))));
        reaper.drop_shared_later(old);
        swapped_tx.send(()).unwrap();
        let worker_id = worker.join().unwrap();
        drop(reaper);
        let on = *dropped_on.lock().unwrap();
        assert!(on.is_some(), "never freed");
        assert_ne!(on, Some(worker_id), "freed by the worker");
        assert_ne!(
            on,
            Some(std::thread::current().id()),
            "freed by the publisher"
        );
    }

    /// A reaper that stops leaves a still-held shared value to its holder.
    #[test]
    fn a_stopped_reaper_leaves_held_values_to_their_holder() {
        let dropped_on = Arc::new(Mutex::new(None));
        let reaper = Reaper::spawn("test-reaper").expect("spawn");
        let value = Arc::new(Probe(Arc::clone(&dropped_on)));
        let mine = Arc::clone(&value);
        reaper.drop_shared_later(value);
        drop(reaper);
        assert_eq!(*dropped_on.lock().unwrap(), None);
        drop(mine);
        assert_eq!(
            *dropped_on.lock().unwrap(),
            Some(std::thread::current().id())
        );
    }
}
