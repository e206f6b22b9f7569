//! Event-sourced accounts through keel-eventstore's
//! [`EventSourcedRepository`].
//!
//! Domain code sees only keel-core's `AggregateRepository` port: `load`,
//! `save` and `execute` (load, decide, save). Underneath, the repository
//! reads the latest snapshot plus the events after it, and appends new
//! events expecting exactly the version it loaded. This example
//!
//! 1. opens an account and pays money in, crossing the snapshot threshold;
//! 2. lets the domain refuse an overdraft (a rejection, nothing written);
//! 3. has two tellers withdraw from the same loaded version: one save wins,
//!    the other gets a structured conflict, reloads and decides again;
//! 4. reads the stream back, forwards and backwards, and checks that the
//!    events alone give the state the repository loaded;
//! 5. loads it with a newer snapshot schema, as the next release would: the
//!    old snapshot is ignored and the state rebuilt from events.

use futures::TryStreamExt;
use keel_core::{
    Aggregate, AggregateRepository, AggregateRoot, CommandError, CorrelationId, DomainError,
    ExpectedVersion, Metadata, Version,
};
use keel_eventstore::{EventSourcedRepository, EventStoreBackend, ReadStream, SnapshotPolicy};
use tracing::info;

use crate::domain::{Account, AccountCommand, AccountEvent};
use crate::{Result, Services, ensure};

/// A snapshot every this many events (small, so the example crosses it).
const SNAPSHOT_EVERY: u64 = 5;

/// The version of `Account`'s serialized shape. Bump it whenever the struct
/// changes: older snapshots are then ignored and the state rebuilt from
/// events.
const SNAPSHOT_SCHEMA: u32 = 1;

/// The repository type a composition root would build once and share.
type Accounts = EventSourcedRepository<Account, dyn EventStoreBackend>;

/// Runs the example.
///
/// # Errors
///
/// A failing store, or a broken invariant: wrong balance or version, no
/// snapshot where one is due, a conflict that did not happen or carried
/// the wrong versions, a stream that does not replay to the loaded state.
pub async fn run(services: &Services) -> Result {
    let store = services.event_store();
    let accounts: Accounts = EventSourcedRepository::new(store.clone())
        .with_snapshots(SnapshotPolicy::every(SNAPSHOT_EVERY), SNAPSHOT_SCHEMA);

    // Ids are scoped by run and example, so runs sharing a database never
    // meet.
    let id = format!("{}-ada", services.scope("es"));
    let stream = Account::stream_id(&id)?;
    let opening = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("clerk:opening");

    // 1. Open and pay in: seven events, so a snapshot is stored at 5.
    accounts
        .execute(
            &id,
            AccountCommand::Open {
                owner: "Ada Lovelace".into(),
            },
            &opening,
        )
        .await?;
    for amount in [100, 250, 75, 30, 45, 500] {
        accounts
            .execute(&id, AccountCommand::Deposit { amount }, &opening)
            .await?;
    }
    let snapshot = store
        .load_snapshot(&stream)
        .await?
        .ok_or("no snapshot was stored")?;
    info!(%stream, version = %snapshot.version, state = %snapshot.state, "snapshot stored");
    ensure(
        snapshot.version == Version::new(5),
        format!("snapshot at version 5, found {}", snapshot.version),
    )?;

    // 2. A rule of the domain says no: the caller gets the domain error,
    //    and the stream is untouched.
    match accounts
        .execute(
            &id,
            AccountCommand::Withdraw { amount: 1_000_000 },
            &opening,
        )
        .await
    {
        Err(CommandError::Rejected(refused)) => {
            info!(
                code = refused.code(),
                message = refused.message(),
                "overdraft refused"
            );
        }
        other => return Err(format!("expected a rejection, got {other:?}").into()),
    }
    ensure(
        store.stream_version(&stream).await? == Version::new(7),
        "a rejected command writes nothing",
    )?;

    // 3. Two tellers load the same version (7, balance 1000) and both
    //    decide a withdrawal. Without a version check both would be stored
    //    and the account would end at -400.
    let mut teller_a = load(&accounts, &id).await?;
    let mut teller_b = load(&accounts, &id).await?;
    teller_a.execute(AccountCommand::Withdraw { amount: 900 })?;
    teller_b.execute(AccountCommand::Withdraw { amount: 500 })?;

    let teller_a_metadata = opening.clone().with_actor("teller:a");
    let teller_b_metadata = opening.clone().with_actor("teller:b");
    accounts.save(&mut teller_a, &teller_a_metadata).await?;
    let Err(lost) = accounts.save(&mut teller_b, &teller_b_metadata).await else {
        return Err("the second save from version 7 was accepted: a lost update".into());
    };
    let conflict = lost
        .as_conflict()
        .ok_or_else(|| format!("expected a version conflict, got {lost}"))?;
    info!(
        expected = ?conflict.expected,
        actual = %conflict.actual,
        "teller b lost the race"
    );
    ensure(
        conflict.expected == ExpectedVersion::Exact(Version::new(7))
            && conflict.actual == Version::new(8),
        "the conflict names the expected (7) and actual (8) versions",
    )?;

    // Handling a conflict means deciding again on fresh state, never
    // re-sending the stale events.
    let retried = retry_on_conflict(
        &accounts,
        &id,
        AccountCommand::Withdraw { amount: 500 },
        &teller_b_metadata,
    )
    .await;
    match retried {
        Err(CommandError::Rejected(refused)) => {
            info!(
                code = refused.code(),
                "on fresh state the withdrawal is refused"
            );
            ensure(
                refused.code() == "account.insufficient_funds",
                "the retry is refused for insufficient funds",
            )?;
        }
        other => return Err(format!("expected the retry to be refused, got {other:?}").into()),
    }

    // 4. Read the stream back. Each stored event keeps its version, global
    //    position, metadata and the server's commit time.
    let history: Vec<_> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await?;
    let mut replayed = Account::default();
    for recorded in &history {
        let envelope = recorded.decode::<AccountEvent>()?;
        info!(
            version = %envelope.version,
            event_type = %envelope.event_type,
            actor = envelope.metadata.actor.as_deref().unwrap_or("-"),
            payload = %recorded.payload,
            "read back"
        );
        replayed.apply(&envelope.payload);
    }
    let versions: Vec<u64> = history.iter().map(|e| e.version.get()).collect();
    ensure(
        versions == (1..=8).collect::<Vec<_>>(),
        format!("versions 1 to 8 without gaps, found {versions:?}"),
    )?;

    let latest: Vec<_> = store
        .read_stream(&stream, ReadStream::backward().limit(2))
        .try_collect()
        .await?;
    ensure(
        latest
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>()
            == ["account.withdrawn", "account.deposited"],
        "a backward read starts at the newest event",
    )?;

    let loaded = load(&accounts, &id).await?;
    info!(balance = loaded.state().balance, version = %loaded.version(), "account loaded");
    ensure(
        loaded.state().balance == 100 && loaded.version() == Version::new(8),
        "balance 100 at version 8",
    )?;
    ensure(
        &replayed == loaded.state(),
        "replaying the events gives the loaded state",
    )?;

    // 5. Snapshots are a cache, never the truth. A new release that changed
    //    `Account`'s shape bumps the snapshot schema version; its repository
    //    ignores the old snapshot (with a warning) and rebuilds from events.
    let next_release: Accounts = EventSourcedRepository::new(store.clone())
        .with_snapshots(SnapshotPolicy::every(SNAPSHOT_EVERY), SNAPSHOT_SCHEMA + 1);
    let rebuilt = load(&next_release, &id).await?;
    ensure(
        rebuilt.state() == loaded.state() && rebuilt.version() == loaded.version(),
        "a repository with a newer snapshot schema rebuilds the same state from events",
    )?;
    Ok(())
}

async fn load(accounts: &Accounts, id: &String) -> Result<AggregateRoot<Account>> {
    Ok(accounts
        .load(id)
        .await?
        .ok_or_else(|| format!("account {id} does not exist"))?)
}

/// Executes `command`, loading fresh state and deciding again when another
/// writer got there first (up to three attempts).
async fn retry_on_conflict(
    accounts: &Accounts,
    id: &String,
    command: AccountCommand,
    metadata: &Metadata,
) -> std::result::Result<Vec<AccountEvent>, CommandError<DomainError>> {
    let mut attempt = 1;
    loop {
        match accounts.execute(id, command.clone(), metadata).await {
            Err(CommandError::Infrastructure(e)) if e.as_conflict().is_some() && attempt < 3 => {
                info!(attempt, "conflict; deciding again on fresh state");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}
