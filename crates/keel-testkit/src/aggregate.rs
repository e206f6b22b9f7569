//! Given/when/then tests for aggregates.

use std::fmt;

use keel_core::Aggregate;

/// A given/when/then test of one [`Aggregate`]: given past events (or
/// commands), when a command is handled, then these events are recorded or
/// the command is rejected.
///
/// The assertions panic with a message that shows the expected and the
/// actual events (compared by their serde JSON form, shown with `Debug`),
/// pointing at the line of the test that failed.
///
/// ```
/// use keel_core::{Aggregate, DomainError, DomainEvent};
/// use keel_testkit::AggregateTest;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Debug)]
/// struct Counter { value: i64 }
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent { Added(i64) }
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "counter.added" }
/// }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "Counter";
///     type Id = u32;
///     type Event = CounterEvent;
///     type Command = i64;
///     type Error = DomainError;
///     fn apply(&mut self, CounterEvent::Added(n): &CounterEvent) { self.value += n; }
///     fn handle(&self, n: i64) -> Result<Vec<CounterEvent>, DomainError> {
///         if self.value + n < 0 {
///             return Err(DomainError::new("counter.negative", "would go below zero"));
///         }
///         Ok(vec![CounterEvent::Added(n)])
///     }
/// }
///
/// AggregateTest::<Counter>::new()
///     .given([CounterEvent::Added(2)])
///     .when(3)
///     .then([CounterEvent::Added(3)])
///     .and_state(|counter| assert_eq!(counter.value, 5));
///
/// AggregateTest::<Counter>::new()
///     .given([CounterEvent::Added(2)])
///     .when(-3)
///     .then_rejected(|err| err.code() == "counter.negative");
/// ```
pub struct AggregateTest<A: Aggregate> {
    state: A,
    history: Vec<A::Event>,
}

impl<A: Aggregate> fmt::Debug for AggregateTest<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateTest")
            .field("history", &self.history)
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate> Default for AggregateTest<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> AggregateTest<A> {
    /// A test of an aggregate with no history.
    pub fn new() -> Self {
        Self {
            state: A::default(),
            history: Vec::new(),
        }
    }

    /// Past events, applied in order (added to any given before).
    #[must_use]
    pub fn given(mut self, events: impl IntoIterator<Item = A::Event>) -> Self {
        for event in events {
            self.state.apply(&event);
            self.history.push(event);
        }
        self
    }

    /// Past commands, handled in order and their events applied; builds the
    /// history through the aggregate's own rules.
    ///
    /// # Panics
    ///
    /// When one of the commands is rejected.
    #[must_use]
    #[track_caller]
    pub fn given_commands(mut self, commands: impl IntoIterator<Item = A::Command>) -> Self {
        for (i, command) in commands.into_iter().enumerate() {
            match self.state.handle(command) {
                Ok(events) => {
                    self = self.given(events);
                }
                Err(err) => panic!(
                    "{}: given command #{} was rejected: {err}\n  error: {err:?}\n  history: {:#?}",
                    A::TYPE,
                    i + 1,
                    self.history
                ),
            }
        }
        self
    }

    /// Handles `command` against the state built from the given history.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.handle(command);
        Outcome {
            state: self.state,
            history: self.history,
            result,
        }
    }
}

/// What happened when the command was handled; check it with one of the
/// `then` methods.
#[must_use = "an outcome checks nothing until one of its `then` methods is called"]
pub struct Outcome<A: Aggregate> {
    state: A,
    history: Vec<A::Event>,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> fmt::Debug for Outcome<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("history", &self.history)
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
}

/// A check of a rejection: a closure returning `bool` (`true` passes), or
/// one that asserts by itself and returns `()`.
pub trait RejectionCheck {
    /// Whether the rejection was the expected one.
    fn passed(self) -> bool;
}

impl RejectionCheck for bool {
    fn passed(self) -> bool {
        self
    }
}

impl RejectionCheck for () {
    fn passed(self) -> bool {
        true
    }
}

impl<A: Aggregate> Outcome<A> {
    /// The raw result, for checks the `then` methods do not cover.
    pub fn result(&self) -> Result<&[A::Event], &A::Error> {
        self.result.as_deref()
    }

    /// Asserts that the command was accepted and recorded exactly
    /// `expected`, in order. Returns the state with the new events applied.
    ///
    /// # Panics
    ///
    /// When the command was rejected or recorded other events.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> Verified<A> {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        let actual = match self.result {
            Ok(events) => events,
            Err(err) => panic!(
                "{}: expected the command to record {} event(s), but it was rejected: {err}\n  \
                 error: {err:?}\n  expected: {expected:#?}\n  history: {:#?}",
                A::TYPE,
                expected.len(),
                self.history
            ),
        };
        if let Some(diff) = difference(&expected, &actual) {
            panic!(
                "{}: the command recorded other events than expected ({diff})\n  \
                 expected: {expected:#?}\n  actual: {actual:#?}\n  history: {:#?}",
                A::TYPE,
                self.history
            );
        }
        let mut state = self.state;
        for event in &actual {
            state.apply(event);
        }
        Verified {
            state,
            events: actual,
        }
    }

    /// Asserts that the command was accepted and recorded nothing (an
    /// idempotent command, say).
    ///
    /// # Panics
    ///
    /// When the command was rejected or recorded events.
    #[track_caller]
    pub fn then_nothing(self) -> Verified<A> {
        self.then([])
    }

    /// Asserts that the command was rejected, and that `check` accepts the
    /// error: return `true`/`false`, or assert inside the closure.
    ///
    /// # Panics
    ///
    /// When the command was accepted or `check` returned `false`.
    #[track_caller]
    pub fn then_rejected<R: RejectionCheck>(self, check: impl FnOnce(&A::Error) -> R) {
        match self.result {
            Ok(events) => panic!(
                "{}: expected the command to be rejected, but it recorded {} event(s): \
                 {events:#?}\n  history: {:#?}",
                A::TYPE,
                events.len(),
                self.history
            ),
            Err(err) => {
                if !check(&err).passed() {
                    panic!(
                        "{}: the command was rejected, but not as expected: {err}\n  error: \
                         {err:?}\n  history: {:#?}",
                        A::TYPE,
                        self.history
                    );
                }
            }
        }
    }

    /// Asserts that the command was rejected with an error whose message
    /// (`Display`) contains `text`.
    ///
    /// # Panics
    ///
    /// When the command was accepted or the message differs.
    #[track_caller]
    pub fn then_rejected_with(self, text: &str) {
        self.then_rejected(|err| err.to_string().contains(text));
    }
}

/// A passed `then`: the new events and the state after them, for further
/// checks.
pub struct Verified<A: Aggregate> {
    state: A,
    events: Vec<A::Event>,
}

impl<A: Aggregate> fmt::Debug for Verified<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("events", &self.events)
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate> Verified<A> {
    /// The state after the new events were applied.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// The events the command recorded.
    pub fn events(&self) -> &[A::Event] {
        &self.events
    }

    /// Runs more checks on the resulting state.
    pub fn and_state(self, check: impl FnOnce(&A)) -> Self {
        check(&self.state);
        self
    }
}

/// Compares two event lists by event type, schema version and JSON payload;
/// `None` when they are equal, else where they first differ.
fn difference<E: keel_core::DomainEvent>(expected: &[E], actual: &[E]) -> Option<String> {
    let key = |e: &E| {
        (
            e.event_type(),
            e.schema_version(),
            serde_json::to_value(e).unwrap_or_else(|err| {
                serde_json::Value::String(format!("<not serializable: {err}>"))
            }),
        )
    };
    for (i, (x, y)) in expected.iter().zip(actual).enumerate() {
        let (x, y) = (key(x), key(y));
        if x != y {
            return Some(format!(
                "first difference at event #{}: expected {} {}, got {} {}",
                i + 1,
                x.0,
                x.2,
                y.0,
                y.2
            ));
        }
    }
    (expected.len() != actual.len())
        .then(|| format!("expected {} event(s), got {}", expected.len(), actual.len()))
}
