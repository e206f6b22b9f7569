//! The README's first command, `cargo run -p keel-examples`, must pick the
//! tour: the package has three binaries (the tour and the two services),
//! and without `default-run` cargo refuses to choose.

#[test]
fn cargo_run_without_bin_runs_the_tour() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("the package manifest");
    let package = manifest
        .split("\n[")
        .next()
        .expect("a [package] table first");
    assert!(
        package
            .lines()
            .any(|line| line.trim() == r#"default-run = "keel-examples""#),
        "[package] must set default-run = \"keel-examples\""
    );
    // The binary it names exists.
    assert!(
        manifest.contains("[[bin]]\nname = \"keel-examples\""),
        "a [[bin]] named keel-examples"
    );
}
