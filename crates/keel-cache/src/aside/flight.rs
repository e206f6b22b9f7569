//! In-process single flight: concurrent misses for one key share one load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What a finished flight hands its followers: the stored envelope, or the
/// loader's error message.
pub(super) type Outcome = Result<Arc<[u8]>, Arc<str>>;

type Slot = watch::Receiver<Option<Outcome>>;

/// The loads in progress, by full key, each with the id of its flight.
#[derive(Default, Debug)]
pub(super) struct Flights {
    in_progress: Mutex<HashMap<String, (u64, Slot)>>,
    next_id: AtomicU64,
}

/// A caller's part in a flight.
pub(super) enum Role<'a> {
    /// This caller runs the load and must [`finish`](Lead::finish) it.
    Leader(Lead<'a>),
    /// Another caller is loading; wait with [`wait`].
    Follower(Slot),
}

impl Flights {
    /// Joins the flight for `key`, starting one (as leader) if none is in
    /// progress.
    pub(super) fn join(&self, key: &str) -> Role<'_> {
        let mut in_progress = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, slot)) = in_progress.get(key) {
            return Role::Follower(slot.clone());
        }
        let (tx, rx) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        in_progress.insert(key.to_owned(), (id, rx));
        Role::Leader(Lead {
            flights: self,
            key: key.to_owned(),
            id,
            tx,
        })
    }

    /// Stops new callers from joining the flight in progress for `key`
    /// (its key was evicted: what it loads may be older than the
    /// eviction). They start a new flight; callers that already joined
    /// still get the old flight's outcome.
    pub(super) fn detach(&self, key: &str) {
        self.in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_progress.lock().unwrap().len()
    }
}

/// The leader's handle. Dropping it without [`finish`](Self::finish) (the
/// leader was cancelled or panicked) ends the flight without an outcome, and
/// its followers start over.
pub(super) struct Lead<'a> {
    flights: &'a Flights,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Lead<'_> {
    /// Hands the outcome to every follower and ends the flight.
    pub(super) fn finish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // The entry may already be gone (detached), and even replaced by a
        // newer flight's: remove it only while it is ours.
        let mut in_progress = self
            .flights
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if in_progress
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            in_progress.remove(&self.key);
        }
    }
}

/// Waits for the flight's outcome; `None` when the leader gave up.
pub(super) async fn wait(mut slot: Slot) -> Option<Outcome> {
    // On `Err` the leader is gone; it may still have finished first.
    let finished = slot.wait_for(Option::is_some).await.ok().map(|o| o.clone());
    finished.unwrap_or_else(|| slot.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome_and_the_flight_ends() {
        let flights = Flights::default();
        let Role::Leader(lead) = flights.join("k") else {
            panic!("first caller leads");
        };
        let Role::Follower(slot) = flights.join("k") else {
            panic!("second caller follows");
        };
        assert!(matches!(flights.join("other"), Role::Leader(_)));
        lead.finish(Ok(Arc::from(&b"v"[..])));
        assert_eq!(flights.len(), 0);
        assert_eq!(wait(slot).await, Some(Ok(Arc::from(&b"v"[..]))));
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn an_abandoned_flight_releases_its_followers() {
        let flights = Flights::default();
        let Role::Leader(lead) = flights.join("k") else {
            panic!("first caller leads");
        };
        let Role::Follower(slot) = flights.join("k") else {
            panic!("second caller follows");
        };
        drop(lead);
        assert_eq!(wait(slot).await, None);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_detached_flight_takes_no_new_followers_and_leaves_the_next_alone() {
        let flights = Flights::default();
        let Role::Leader(old) = flights.join("k") else {
            panic!("first caller leads");
        };
        let Role::Follower(early) = flights.join("k") else {
            panic!("second caller follows");
        };
        flights.detach("k");
        let Role::Leader(new) = flights.join("k") else {
            panic!("after a detach, the next caller leads a new flight");
        };
        // The old leader ends after the new one started: the new flight
        // must stay joinable.
        old.finish(Ok(Arc::from(&b"old"[..])));
        assert_eq!(wait(early).await, Some(Ok(Arc::from(&b"old"[..]))));
        let Role::Follower(late) = flights.join("k") else {
            panic!("the new flight was removed by the old leader");
        };
        new.finish(Ok(Arc::from(&b"new"[..])));
        assert_eq!(wait(late).await, Some(Ok(Arc::from(&b"new"[..]))));
        assert_eq!(flights.len(), 0);
    }
}
