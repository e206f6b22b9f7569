//! Compiles `proto/` (at the workspace root) with protox, a protobuf
//! compiler written in Rust, and generates the Rust types with
//! tonic-prost-build from the resulting descriptor set. No `protoc` runs,
//! so a fresh machine builds this crate with cargo alone.

use std::path::PathBuf;

use prost::Message as _;

/// Every file compiled; their imports (Keel's or the well-known types that
/// protox carries) are found under the include root.
const FILES: &[&str] = &[
    "keel/v1/envelope.proto",
    "examples/ordering/v1/ordering.proto",
    "examples/shipping/v1/shipping.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../../proto");
    // A directory: cargo reruns the script when any file below it changes.
    println!("cargo:rerun-if-changed={}", root.display());

    let descriptors = protox::compile(FILES, [&root])?;

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // With imports, so reflection can answer for google.protobuf types too.
    std::fs::write(out.join("keel_descriptor.bin"), descriptors.encode_to_vec())?;

    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
