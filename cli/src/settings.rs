//! Where nkctl finds its hub, token and CA: flags, then environment
//! (`NODEKEEPER_HUB`, `NODEKEEPER_TOKEN`, `NODEKEEPER_CA`), then a small
//! file in the user's config dir (`$XDG_CONFIG_HOME/nodekeeper/nkctl.yaml`,
//! or the file `NKCTL_CONFIG` names), so an operator does not export them
//! every time.

use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

/// The config file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub hub: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// The config file's path.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NKCTL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("nodekeeper").join("nkctl.yaml"))
}

/// Reads the config file; none at the default path is no error.
pub fn load() -> anyhow::Result<FileConfig> {
    let Some(p) = path() else {
        return Ok(FileConfig::default());
    };
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("NKCTL_CONFIG").is_none() => {
            return Ok(FileConfig::default());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let mut c: FileConfig = serde_norway::from_str(&text).with_context(|| format!("{}", p.display()))?;
    if c.token.is_none()
        && let Some(f) = &c.token_file
    {
        c.token = Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("{}: tokenFile {}", p.display(), f.display()))?
                .trim()
                .to_string(),
        );
    }
    Ok(c)
}
