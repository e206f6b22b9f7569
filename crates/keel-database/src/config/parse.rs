//! Parsing connection URLs and setting values, and the errors that name
//! the setting.

use super::*;

/// The query parameters sqlx understands in a connection URL.
const KNOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Parses a connection URL, never echoing it (it may hold a password).
pub(super) fn parse_url(url: &str) -> Result<(PgConnectOptions, bool)> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(config_error(
            "url",
            "not a URL; expected postgres://user:password@host:port/database",
        ));
    };
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return Err(config_error(
            "url",
            format!("unsupported scheme {scheme:?}; expected postgres:// or postgresql://"),
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let password = userinfo.and_then(|u| u.split_once(':')).map(|(_, p)| p);
    let query = rest
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or_default())
        .unwrap_or_default();
    let mut query_password = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        // sqlx ignores unknown parameters with a log line that includes the
        // value; a misspelt `pasword=` would leak it and be ignored. Refuse
        // them instead, naming only the key.
        let known = KNOWN_URL_PARAMETERS.contains(&key)
            || (key.starts_with("options[") && key.ends_with(']'));
        if !known {
            return Err(config_error(
                "url",
                format!(
                    "unknown connection parameter {key:?}; expected one of {}",
                    KNOWN_URL_PARAMETERS.join(", ")
                ),
            ));
        }
        query_password |= key == "password";
    }
    let has_password = password.is_some_and(|p| !p.is_empty()) || query_password;

    let options = PgConnectOptions::from_str(url).map_err(|e| {
        let mut reason = match &e {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            other => other.to_string(),
        };
        // Belt and braces: the parser's messages do not quote the URL
        // today; make sure a future one cannot leak the credentials.
        for secret in [userinfo, password].into_iter().flatten() {
            if !secret.is_empty() {
                reason = reason.replace(secret, "<redacted>");
            }
        }
        config_error("url", format!("malformed connection URL: {reason}"))
    })?;
    Ok((options, has_password))
}

pub(crate) fn config_error(
    setting: impl Into<Cow<'static, str>>,
    reason: impl Into<String>,
) -> DatabaseError {
    DatabaseError::Config {
        setting: setting.into(),
        reason: reason.into(),
    }
}

/// Errors from `build()` name builder settings; `from_env` renames the
/// ones that came from a variable.
pub(super) fn rename_setting(e: DatabaseError) -> DatabaseError {
    match e {
        DatabaseError::Config { setting, reason } => {
            let var = match &*setting {
                "url" => Some(env::DATABASE_URL),
                "max_connections" => Some(env::MAX_CONNECTIONS),
                "min_connections" => Some(env::MIN_CONNECTIONS),
                "acquire_timeout" => Some(env::ACQUIRE_TIMEOUT),
                "connect_timeout" => Some(env::CONNECT_TIMEOUT),
                "statement_timeout" => Some(env::STATEMENT_TIMEOUT),
                "lock_timeout" => Some(env::LOCK_TIMEOUT),
                "idle_in_transaction_session_timeout" => Some(env::IDLE_IN_TRANSACTION_TIMEOUT),
                "application_name" => Some(env::APPLICATION_NAME),
                "tls_mode" => Some(env::TLS_MODE),
                "tls_ca_file" => Some(env::TLS_CA_FILE),
                "retry.max_attempts" => Some(env::TRANSACTION_ATTEMPTS),
                _ => None,
            };
            DatabaseError::Config {
                setting: var.map_or(setting, Cow::Borrowed),
                reason,
            }
        }
        other => other,
    }
}

pub(super) fn positive(setting: &'static str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        Err(config_error(setting, "must be greater than zero"))
    } else {
        Ok(d)
    }
}

pub(super) fn non_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

pub(super) fn parse_count(var: &'static str, value: &str) -> Result<u32> {
    value.trim().parse::<u32>().map_err(|_| {
        config_error(
            var,
            format!("expected a whole number, got {:?}", value.trim()),
        )
    })
}

/// Parses `500ms`, `5s`, `2m`, `1h` or `0`.
pub(crate) fn parse_duration(var: &'static str, value: &str) -> Result<Duration> {
    let v = value.trim();
    let bad = || {
        config_error(
            var,
            format!("expected a duration such as 500ms, 5s, 2m or 1h, got {v:?}"),
        )
    };
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = v.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(d)
}
