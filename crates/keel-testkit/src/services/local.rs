//! Starting a service from local binaries on a free port, shared across
//! the test run's processes (see the [module docs](super)).

use super::*;

impl Discovery {
    pub(super) fn start(&self, service: Service) -> Result<Endpoint> {
        let dir = self.service_dir(service);
        let address = match service {
            Service::Postgres => {
                let bin = PgBin::find()?;
                shared::ensure(&dir, service, self.idle_timeout, |work, port| {
                    let data = pg::init_cluster(&bin, work, port, &Auth::Trust, 500)?;
                    let mut argv: Vec<OsString> = Vec::new();
                    if sys::is_root() {
                        argv.extend(
                            ["runuser", "-u", sys::POSTGRES_USER, "--"].map(OsString::from),
                        );
                    }
                    argv.push(bin.path("postgres").into());
                    argv.push("-D".into());
                    argv.push(data.into());
                    Ok(shared::Launch {
                        argv,
                        stop: shared::STOP_POSTGRES,
                        startup: Duration::from_secs(60),
                    })
                })?
            }
            Service::Redis => {
                let program = self.redis_program()?;
                shared::ensure(&dir, service, self.idle_timeout, |work, port| {
                    let mut argv: Vec<OsString> = vec![program.into()];
                    argv.extend(
                        [
                            "--port",
                            &port.to_string(),
                            "--bind",
                            "127.0.0.1",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            "--daemonize",
                            "no",
                            "--protected-mode",
                            "no",
                        ]
                        .map(OsString::from),
                    );
                    argv.extend(["--dir".into(), work.as_os_str().to_owned()]);
                    Ok(shared::Launch {
                        argv,
                        stop: shared::STOP_TERM,
                        startup: Duration::from_secs(20),
                    })
                })?
            }
            Service::PubSubEmulator => {
                let program = self.emulator_program()?;
                shared::ensure(&dir, service, self.idle_timeout, |_work, port| {
                    Ok(shared::Launch {
                        argv: vec![
                            program.into(),
                            "--host=127.0.0.1".into(),
                            format!("--port={port}").into(),
                        ],
                        stop: shared::STOP_TERM,
                        startup: Duration::from_secs(120),
                    })
                })?
            }
            Service::Meilisearch => {
                let program = self.meilisearch_program()?;
                shared::ensure(&dir, service, self.idle_timeout, |work, port| {
                    let mut argv: Vec<OsString> = vec![program.into()];
                    argv.extend(
                        [
                            "--http-addr",
                            &format!("127.0.0.1:{port}"),
                            "--master-key",
                            MEILISEARCH_TEST_KEY,
                            "--env",
                            "development",
                            "--no-analytics",
                        ]
                        .map(OsString::from),
                    );
                    argv.extend(["--db-path".into(), work.join("data.ms").into_os_string()]);
                    argv.extend(["--dump-dir".into(), work.join("dumps").into_os_string()]);
                    argv.extend([
                        "--snapshot-dir".into(),
                        work.join("snapshots").into_os_string(),
                    ]);
                    Ok(shared::Launch {
                        argv,
                        stop: shared::STOP_TERM,
                        startup: Duration::from_secs(60),
                    })
                })?
            }
        };
        Ok(Endpoint {
            service,
            connection: service.connection_string(&address),
            source: Source::Started,
        })
    }

    fn redis_program(&self) -> Result<PathBuf> {
        let found = self
            .programs
            .get(&Service::Redis)
            .cloned()
            .or_else(|| sys::which("redis-server"))
            .or_else(|| existing("/usr/bin/redis-server"))
            .or_else(|| existing("/usr/sbin/redis-server"));
        found
            .filter(|p| p.is_file())
            .ok_or(Error::ServiceUnavailable {
                service: Service::Redis,
                tried:
                    "  - local binaries: no `redis-server` on PATH (or KEEL_TESTKIT_REDIS_SERVER)"
                        .to_owned(),
                hint: Service::Redis.hint(),
            })
    }

    fn meilisearch_program(&self) -> Result<PathBuf> {
        self.programs
            .get(&Service::Meilisearch)
            .cloned()
            .or_else(|| sys::which("meilisearch"))
            .filter(|p| p.is_file())
            .ok_or(Error::ServiceUnavailable {
                service: Service::Meilisearch,
                tried: "  - local binaries: MEILISEARCH_BIN is not set and there is no \
                        `meilisearch` on PATH"
                    .to_owned(),
                hint: Service::Meilisearch.hint(),
            })
    }

    fn emulator_program(&self) -> Result<PathBuf> {
        const RELATIVE: &str = "platform/pubsub-emulator/bin/cloud-pubsub-emulator";
        let from_gcloud = || {
            let gcloud = sys::which("gcloud")?;
            let gcloud = std::fs::canonicalize(gcloud).ok()?;
            // gcloud lives in <sdk>/bin/gcloud.
            existing(gcloud.parent()?.parent()?.join(RELATIVE))
        };
        let found = self
            .programs
            .get(&Service::PubSubEmulator)
            .cloned()
            .or_else(|| existing(Path::new("/usr/lib/google-cloud-sdk").join(RELATIVE)))
            .or_else(|| existing(Path::new("/usr/share/google-cloud-sdk").join(RELATIVE)))
            .or_else(from_gcloud);
        let missing = |what: &str| Error::ServiceUnavailable {
            service: Service::PubSubEmulator,
            tried: format!("  - local binaries: {what}"),
            hint: Service::PubSubEmulator.hint(),
        };
        let program = found.filter(|p| p.is_file()).ok_or_else(|| {
            missing(
                "no cloud-pubsub-emulator in /usr/lib/google-cloud-sdk, next to gcloud, or \
                 KEEL_TESTKIT_PUBSUB_EMULATOR",
            )
        })?;
        if std::env::var_os("JAVA_HOME").is_none() && sys::which("java").is_none() {
            return Err(missing(
                "the emulator needs Java, and there is no `java` on PATH",
            ));
        }
        Ok(program)
    }
}
