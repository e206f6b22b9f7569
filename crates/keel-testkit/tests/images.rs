//! The container images are named in three places: the test kit's
//! testcontainers path (`Service::container_image`), `docker-compose.yml`
//! and the table in `docs/testing.md`. They must name the same images, each
//! pinned to one release.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_testkit::services::Service;

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The compose service that runs `service`.
fn compose_name(service: Service) -> &'static str {
    match service {
        Service::Postgres => "postgres",
        Service::Redis => "redis",
        Service::PubSubEmulator => "pubsub",
        Service::Meilisearch => "meilisearch",
        other => panic!("no compose service for {other:?}: add it here and to the compose file"),
    }
}

fn kit_image(service: Service) -> String {
    let (name, tag) = service.container_image();
    format!("{name}:{tag}")
}

/// `image:` of each service under `services:` in a compose file.
fn compose_images(text: &str) -> BTreeMap<String, String> {
    let mut images = BTreeMap::new();
    let mut in_services = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            in_services = line.trim_end() == "services:";
            current = None;
            continue;
        }
        if !in_services {
            continue;
        }
        // A service: two spaces of indent, a name, a colon.
        if let Some(name) = line.strip_prefix("  ")
            && !name.starts_with(' ')
            && !name.starts_with('#')
            && let Some(name) = name.trim_end().strip_suffix(':')
        {
            current = Some(name.to_owned());
            continue;
        }
        if let (Some(service), Some(image)) = (&current, line.trim().strip_prefix("image:")) {
            images.insert(service.clone(), image.trim().trim_matches('"').to_owned());
        }
    }
    images
}

/// The images in backticks on the testcontainers row of the docs' table.
fn docs_images(text: &str) -> Vec<String> {
    let row = text
        .lines()
        .find(|l| l.starts_with("| 3. testcontainers"))
        .expect("docs/testing.md has the testcontainers row in its sources table");
    // The first cell describes the source; the others hold one image each.
    row.split('|')
        .skip(2)
        .filter(|cell| !cell.trim().is_empty())
        .map(|cell| cell.trim().trim_matches('`').to_owned())
        .collect()
}

/// A tag that names one release: a version with at least two parts, not a
/// moving name such as `latest`, `15-alpine` or `emulators`.
fn is_pinned(image: &str) -> bool {
    let Some((_, tag)) = image.rsplit_once(':') else {
        return false;
    };
    let version = tag.trim_start_matches('v');
    let numeric: String = version
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    numeric.split('.').filter(|p| !p.is_empty()).count() >= 2
        && numeric
            .split('.')
            .all(|p| p.chars().all(|c| c.is_ascii_digit()))
}

#[test]
fn code_compose_file_and_docs_name_the_same_pinned_images() {
    let compose = compose_images(&repo_file("docker-compose.yml"));
    let docs = docs_images(&repo_file("docs/testing.md"));
    assert_eq!(
        docs.len(),
        Service::ALL.len(),
        "one image per service: {docs:?}"
    );
    for (i, service) in Service::ALL.into_iter().enumerate() {
        let image = kit_image(service);
        assert!(
            is_pinned(&image),
            "{service:?}: `{image}` names no single release"
        );
        assert_eq!(
            compose.get(compose_name(service)),
            Some(&image),
            "{service:?}: docker-compose.yml and the test kit disagree"
        );
        // The table's columns follow `Service::ALL`.
        assert_eq!(
            docs[i], image,
            "{service:?}: docs/testing.md and the test kit disagree"
        );
    }
}

#[test]
fn floating_tags_are_recognised() {
    for floating in [
        "postgres:15",
        "postgres:15-alpine",
        "redis:7-alpine",
        "redis:latest",
        "gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators",
        "getmeili/meilisearch",
    ] {
        assert!(!is_pinned(floating), "{floating}");
    }
    for pinned in [
        "postgres:15.20-alpine",
        "redis:7.0.15-alpine",
        "gcr.io/google.com/cloudsdktool/google-cloud-cli:573.0.0-emulators",
        "getmeili/meilisearch:v1.30.1",
    ] {
        assert!(is_pinned(pinned), "{pinned}");
    }
}

#[test]
fn the_compose_reader_finds_each_service_image() {
    let text = "name: x\n\nservices:\n  db:\n    # a comment\n    image: postgres:15.20-alpine\n    \
                ports:\n      - \"1:1\"\n  cache:\n    image: \"redis:7.0.15-alpine\"\n\nvolumes:\n  \
                data:\n";
    let images = compose_images(text);
    assert_eq!(images.len(), 2, "{images:?}");
    assert_eq!(images["db"], "postgres:15.20-alpine");
    assert_eq!(images["cache"], "redis:7.0.15-alpine");
}
