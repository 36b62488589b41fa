//! Loading daemon configuration files: YAML, every key defaulted, unknown or
//! invalid keys refused with the file, the key and the reason.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid { path: PathBuf, key: String, reason: String },
}

impl ConfigError {
    /// An invalid value found after parsing (a semantic check).
    pub fn invalid(path: &Path, key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Reads `path` into `T`. A missing file is an error only when `required`
/// (an explicitly given `--config`); otherwise every key takes its default.
pub fn load<T: DeserializeOwned + Default>(path: &Path, required: bool) -> Result<T, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(T::default()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse(path, &text)
}

/// Parses configuration text; `path` is only used in errors.
pub fn parse<T: DeserializeOwned + Default>(path: &Path, text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { "(top level)".to_string() } else { key };
        let reason = e.into_inner().to_string();
        // serde_norway prefixes the path itself; keep it once.
        let reason = reason
            .strip_prefix(&format!("{key}: "))
            .map(String::from)
            .unwrap_or(reason);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        }
    })
}

/// Checks the `logLevel` and `logFormat` keys both daemons have.
pub fn check_logging(path: &Path, level: &str, format: &str) -> Result<(), ConfigError> {
    if !crate::validate::LOG_LEVELS.contains(&level) {
        return Err(ConfigError::invalid(
            path,
            "logLevel",
            format!(
                "{level:?} is not a log level; one of {}",
                crate::validate::LOG_LEVELS.join(", ")
            ),
        ));
    }
    if !matches!(format, "text" | "json") {
        return Err(ConfigError::invalid(
            path,
            "logFormat",
            format!("{format:?}: must be text or json"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(rename_all = "camelCase", default, deny_unknown_fields)]
    struct Cfg {
        state_dir: String,
        hub: Hub,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Hub {
        address: Option<String>,
        port: u16,
    }

    #[test]
    fn unknown_and_invalid_keys_name_the_key() {
        let p = Path::new("/etc/x.yaml");
        let e = parse::<Cfg>(p, "hub:\n  adress: x\n").expect_err("unknown key");
        let s = e.to_string();
        assert!(
            s.contains("/etc/x.yaml") && s.contains("hub.adress") && s.contains("unknown field"),
            "{s}"
        );
        let e = parse::<Cfg>(p, "hub:\n  port: lots\n").expect_err("bad value");
        assert!(e.to_string().contains("hub.port"), "{e}");
        let c = parse::<Cfg>(p, "stateDir: /tmp/a\nhub: {address: 'http://h:1'}\n").expect("valid");
        assert_eq!(c.state_dir, "/tmp/a");
        assert_eq!(c.hub.address.as_deref(), Some("http://h:1"));
        assert_eq!(c.hub.port, 0);
    }

    #[test]
    fn missing_file_defaults_only_when_not_required() {
        let p = Path::new("/nonexistent/nodekeeper.yaml");
        assert!(load::<Cfg>(p, false).is_ok());
        assert!(matches!(load::<Cfg>(p, true), Err(ConfigError::Read { .. })));
    }
}
