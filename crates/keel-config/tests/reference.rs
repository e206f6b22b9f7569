//! `docs/configuration.md` lists every key, its default and its variables,
//! exactly as the code defines them.

use keel_config::KeelConfig;
use keel_config::env::{LEGACY_VARIABLES, variable_for};

/// The table rows the page must have, in order.
fn expected_rows() -> Vec<String> {
    KeelConfig::default_keys()
        .into_iter()
        .map(|(key, default)| {
            let default = if default.is_empty() {
                "unset".to_owned()
            } else {
                format!("`{default}`")
            };
            let mut vars = vec![format!("`{}`", variable_for(&key))];
            vars.extend(
                LEGACY_VARIABLES
                    .iter()
                    .filter(|(_, k)| *k == key)
                    .map(|(v, _)| format!("`{v}`")),
            );
            format!("| `{key}` | {default} | {} |", vars.join(", "))
        })
        .collect()
}

#[test]
fn the_reference_page_lists_every_key_default_and_variable() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .unwrap();
    // The first three columns of each row of the key table; the fourth is
    // prose.
    let (_, table) = page
        .split_once("## Every key")
        .expect("the key table's heading");
    let found: Vec<String> = table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            format!("{} | {} | {} |", cells[0], cells[1], cells[2])
        })
        .collect();
    let expected = expected_rows();
    assert!(
        found == expected,
        "docs/configuration.md is out of date; its key rows must start with:\n{}",
        expected.join("\n")
    );
}
