//! The verifier's metrics, on the global meter provider (a binary of its
//! own, since that provider is process-wide).

use std::sync::Arc;
use std::time::Duration;

use keel_core::{AuditEntry, AuditLog, AuditOutcome, HealthCheck, HealthStatus};
use keel_security::audit::{
    AuditVerifier, InMemoryAuditLog, VERIFIED_SEQUENCE, VERIFY_FAILURES, VerifierOutcome,
};
use keel_telemetry::testing::MetricsProbe;

#[tokio::test]
async fn failures_are_counted_and_the_verified_sequence_recorded() {
    let probe = MetricsProbe::new();
    probe.install_global();
    let log = Arc::new(InMemoryAuditLog::new());
    for i in 0..4 {
        log.append(AuditEntry::new(format!("cmd.{i}"), AuditOutcome::Accepted))
            .await
            .unwrap();
    }
    let verifier = AuditVerifier::spawn(log.clone(), Duration::from_secs(3_600));
    verifier.verify_now().await.unwrap();
    assert_eq!(probe.value(VERIFIED_SEQUENCE, &[]), 4.0);
    assert_eq!(probe.value(VERIFY_FAILURES, &[]), 0.0);

    // A verifier that starts from a head the log never had finds a fault
    // on every pass, and counts each.
    let wrong = keel_security::audit::ChainHead {
        sequence: 2,
        hash: "f".repeat(64),
    };
    let suspicious = AuditVerifier::new(log)
        .interval(Duration::from_secs(3_600))
        .starting_from(wrong)
        .start();
    for _ in 0..2 {
        let status = suspicious.verify_now().await.unwrap();
        assert!(matches!(
            status.outcome,
            VerifierOutcome::Broken { sequence: 2, .. }
        ));
    }
    assert_eq!(suspicious.check().await.status, HealthStatus::Degraded);
    // The pass at start-up, then the two asked for.
    assert_eq!(probe.value(VERIFY_FAILURES, &[("kind", "broken")]), 3.0);
    assert_eq!(probe.value(VERIFY_FAILURES, &[("kind", "error")]), 0.0);
}
