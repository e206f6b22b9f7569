//! In-process single flight: concurrent misses for one key share one load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What a finished flight hands its followers: the stored envelope, or the
/// loader's error message.
pub(super) type Outcome = Result<Arc<[u8]>, Arc<str>>;

type Slot = watch::Receiver<Option<Outcome>>;

/// The loads in progress, by full key.
#[derive(Default, Debug)]
pub(super) struct Flights {
    in_progress: Mutex<HashMap<String, Slot>>,
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
        if let Some(slot) = in_progress.get(key) {
            return Role::Follower(slot.clone());
        }
        let (tx, rx) = watch::channel(None);
        in_progress.insert(key.to_owned(), rx);
        Role::Leader(Lead {
            flights: self,
            key: key.to_owned(),
            tx,
        })
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
        // Only the leader inserts or removes its key, and a new leader can
        // only start after this removal: the entry is ours.
        self.flights
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
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
}
