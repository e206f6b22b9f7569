//! Mappings are validated when a repository is built: a bad identifier or
//! an impossible column declaration never reaches SQL.

use keel_core::{Entity, EntityWriter, Error};
use keel_repository::{
    Column, ColumnType, InMemoryRepository, Mapped, Mapping, RepositoryError, Result, Row,
    RowWriter, Value,
};

#[derive(Clone, Debug)]
struct Probe(String);

impl Entity for Probe {
    type Id = String;
    const NAME: &'static str = "probe";
    fn id(&self) -> &String {
        &self.0
    }
}

thread_local! {
    static MAPPING: std::cell::RefCell<Option<Mapping>> = const { std::cell::RefCell::new(None) };
    static WRITE: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

impl Mapped for Probe {
    fn mapping() -> Mapping {
        MAPPING.with(|m| m.borrow().clone().expect("mapping set by the test"))
    }
    fn id_value(id: &String) -> Value {
        id.into()
    }
    fn write(&self, row: &mut RowWriter<'_>) {
        row.set("id", &self.0);
        match WRITE.with(|w| w.get()) {
            0 => {
                row.set("n", 1_i64);
            }
            1 => {}
            2 => {
                row.set("n", "text");
            }
            _ => {
                row.set("n", 1_i64).set("ghost", 2_i64);
            }
        }
    }
    fn read(row: &mut Row<'_>) -> Result<Self> {
        Ok(Probe(row.get("id")?))
    }
}

fn build(mapping: Mapping) -> Result<InMemoryRepository<Probe>> {
    MAPPING.with(|m| *m.borrow_mut() = Some(mapping));
    InMemoryRepository::<Probe>::new()
}

fn ok() -> Mapping {
    Mapping::new("probes")
        .id("id", ColumnType::Text)
        .column(Column::new("n", ColumnType::I64).filterable().sortable())
}

#[test]
fn bad_mappings_are_refused() {
    assert!(build(ok()).is_ok());
    let cases = [
        Mapping::new("Probes").id("id", ColumnType::Text),
        Mapping::new("probes; DROP TABLE x").id("id", ColumnType::Text),
        Mapping::new("a.b.c").id("id", ColumnType::Text),
        Mapping::new("probes"),
        Mapping::new("probes").id("id", ColumnType::F64),
        Mapping::new("probes").id("x\" text", ColumnType::Text),
        ok().column(Column::new("n", ColumnType::I64)),
        ok().column(Column::new("version", ColumnType::I64)),
        ok().column(Column::new("deleted_at", ColumnType::Timestamp)),
        ok().column(Column::new("doc", ColumnType::Json).filterable()),
        ok().column(Column::new("maybe", ColumnType::Text).nullable().sortable()),
    ];
    for mapping in cases {
        let shown = format!("{mapping:?}");
        match build(mapping) {
            Err(RepositoryError::Mapping { entity, .. }) => assert_eq!(entity, "probe"),
            other => panic!("{shown}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn rows_that_do_not_fit_the_mapping_are_refused() {
    let repo = build(ok()).unwrap();
    for (mode, needle) in [
        (1, "did not set column `n`"),
        (2, "`n`"),
        (3, "undeclared column `ghost`"),
    ] {
        WRITE.with(|w| w.set(mode));
        let err = repo.insert(Probe("a".into())).await.unwrap_err();
        match &err {
            Error::Internal { message, .. } => assert!(message.contains(needle), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    WRITE.with(|w| w.set(0));
    repo.insert(Probe("a".into())).await.unwrap();
}
