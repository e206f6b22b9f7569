//! Repository base for state-based entities: CRUD, optimistic locking,
//! automatic timestamps, soft delete, filtering and two kinds of pagination,
//! on PostgreSQL and in memory.
//!
//! (Docs in progress.)

mod cursor;
mod error;
mod mapping;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod query;
#[cfg(feature = "testing")]
pub mod testing;
mod value;

pub use error::{RepositoryError, Result};
pub use mapping::{Column, Mapped, Mapping, Row, RowWriter};
pub use memory::InMemoryRepository;
#[cfg(feature = "postgres")]
pub use postgres::{OnConnection, PgRepository};
pub use query::{DEFAULT_MAX_PAGE_SIZE, MAX_IN_LIST};
pub use value::{ColumnType, FromValue, Value};
