//! Domain code depends on `keel-core` alone.
//!
//! Every workspace package named `*-domain` may depend (normally or at
//! build time) only on `keel-core` and plain data crates ([`ALLOWED`]);
//! test-only dependencies are free. The check reads the workspace through
//! `cargo metadata --no-deps`, so inherited (`workspace = true`), renamed and
//! target-specific dependencies are all seen as Cargo sees them.

use std::process::Command;

use serde_json::Value;

/// What a domain crate may depend on besides `keel-core`.
const ALLOWED: &[&str] = &["keel-core", "serde", "thiserror", "uuid", "chrono"];

/// The domain crates that must exist: a rename must not silently skip the check.
const EXPECTED: &[&str] = &["ordering-domain", "shipping-domain"];

fn workspace_metadata() -> Value {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The forbidden dependencies of every `*-domain` package, as
/// `(package, dependency)`, and the names of the domain packages seen.
fn violations(metadata: &Value) -> (Vec<String>, Vec<(String, String)>) {
    let mut seen = Vec::new();
    let mut bad = Vec::new();
    let packages = metadata["packages"].as_array().expect("a package list");
    for package in packages {
        let name = package["name"].as_str().expect("a package name");
        if !name.ends_with("-domain") {
            continue;
        }
        seen.push(name.to_owned());
        for dep in package["dependencies"]
            .as_array()
            .expect("a dependency list")
        {
            // `kind` is null for normal dependencies, "build" or "dev" otherwise.
            if dep["kind"].as_str() == Some("dev") {
                continue;
            }
            let dep_name = dep["name"].as_str().expect("a dependency name");
            if !ALLOWED.contains(&dep_name) {
                bad.push((name.to_owned(), dep_name.to_owned()));
            }
        }
    }
    seen.sort();
    (seen, bad)
}

#[test]
fn domain_crates_depend_on_keel_core_alone() {
    let (seen, bad) = violations(&workspace_metadata());
    for expected in EXPECTED {
        assert!(
            seen.iter().any(|s| s == expected),
            "domain crate {expected} is missing from the workspace (saw {seen:?})"
        );
    }
    assert!(
        bad.is_empty(),
        "domain crates may depend only on {ALLOWED:?}; found {bad:?}"
    );
}

#[test]
fn the_check_catches_infrastructure_in_a_domain_crate() {
    let metadata = serde_json::json!({
        "packages": [
            {
                "name": "billing-domain",
                "dependencies": [
                    { "name": "keel-core", "kind": null },
                    { "name": "sqlx", "kind": null },
                    { "name": "tonic", "kind": "build" },
                    { "name": "keel-testkit", "kind": "dev" }
                ]
            },
            {
                "name": "billing",
                "dependencies": [{ "name": "keel-eventstore", "kind": null }]
            }
        ]
    });
    let (seen, bad) = violations(&metadata);
    assert_eq!(seen, ["billing-domain"]);
    assert_eq!(
        bad,
        [
            ("billing-domain".to_owned(), "sqlx".to_owned()),
            ("billing-domain".to_owned(), "tonic".to_owned()),
        ]
    );
}
