//! keel-update's settings: the image's (`/usr/lib/keel/update/config.toml`, written by `keel
//! build` from the definition's `[update]`, with the repository's root.json beside it) and the
//! node's overrides (`/etc/keel/update.toml`, e.g. from Ignition: a mirror, a strategy, off).

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const IMAGE_CONFIG: &str = "/usr/lib/keel/update/config.toml";
pub const IMAGE_ROOT: &str = "/usr/lib/keel/update/root.json";
pub const NODE_CONFIG: &str = "/etc/keel/update.toml";
pub const STATE_DIR: &str = "/var/lib/keel/update";

/// What happens once a release is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reboot {
    /// Activate and reboot at once (a single machine, or a fleet that coordinates otherwise).
    Immediate,
    /// Install and wait: `keel-update apply` (or the operator's own reboot tooling) activates.
    #[default]
    Off,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    repository: Option<String>,
    enabled: Option<bool>,
    reboot: Option<Reboot>,
    tries: Option<u32>,
    health_timeout_secs: Option<u64>,
    min_version: Option<String>,
    health_units: Option<Vec<String>>,
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    pub repository: Option<String>,
    pub enabled: bool,
    pub reboot: Reboot,
    /// Boot attempts a new version gets before the loader falls back.
    pub tries: u32,
    pub health_timeout_secs: u64,
    /// The oldest version this node may run.
    pub min_version: Option<String>,
    /// The units a trial boot must bring up (the image's enabled services).
    pub health_units: Vec<String>,
    /// Where each setting came from, for `status`.
    pub sources: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn read(path: &Path) -> Result<Option<Raw>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: e.to_string(),
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            path: path.into(),
            message: e.to_string(),
        })
}

impl Config {
    /// The image's settings with the node's laid over them.
    pub fn load(image: &Path, node: &Path) -> Result<Config, ConfigError> {
        let mut c = Config {
            repository: None,
            enabled: true,
            reboot: Reboot::default(),
            tries: 2,
            health_timeout_secs: 600,
            min_version: None,
            health_units: Vec::new(),
            sources: Vec::new(),
        };
        for path in [image, node] {
            let Some(raw) = read(path)? else { continue };
            c.sources.push(path.to_path_buf());
            if let Some(r) = raw.repository {
                crate::update::tuf::Address::parse(&r).map_err(|e| ConfigError::Invalid {
                    path: path.into(),
                    message: format!("repository: {e}"),
                })?;
                c.repository = Some(r);
            }
            if let Some(v) = raw.enabled {
                c.enabled = v;
            }
            if let Some(v) = raw.reboot {
                c.reboot = v;
            }
            if let Some(v) = raw.tries {
                if !(1..=9).contains(&v) {
                    return Err(ConfigError::Invalid {
                        path: path.into(),
                        message: format!("tries = {v}: between 1 and 9"),
                    });
                }
                c.tries = v;
            }
            if let Some(v) = raw.health_timeout_secs {
                c.health_timeout_secs = v;
            }
            // A node's file may raise the image's floor, never lower it.
            if let Some(v) = raw.min_version {
                let higher = c
                    .min_version
                    .as_deref()
                    .is_none_or(|old| crate::update::version::newer(&v, old));
                if higher {
                    c.min_version = Some(v);
                }
            }
            if let Some(v) = raw.health_units {
                c.health_units = v;
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_settings_override_the_image() {
        let t = tempfile::tempdir().expect("tempdir");
        let (img, node) = (t.path().join("image.toml"), t.path().join("node.toml"));
        std::fs::write(
            &img,
            "repository = \"https://updates.example/x/\"\ntries = 2\n",
        )
        .expect("w");
        let c = Config::load(&img, &node).expect("image only");
        assert_eq!(c.repository.as_deref(), Some("https://updates.example/x/"));
        assert_eq!(c.reboot, Reboot::Off);
        std::fs::write(
            &node,
            "repository = \"file:///mnt/mirror/\"\nreboot = \"immediate\"\n",
        )
        .expect("w");
        let c = Config::load(&img, &node).expect("both");
        assert_eq!(c.repository.as_deref(), Some("file:///mnt/mirror/"));
        assert_eq!(c.reboot, Reboot::Immediate);
        assert_eq!(c.tries, 2);
        std::fs::write(&img, "min-version = \"0.3\"\n").expect("w");
        std::fs::write(&node, "min-version = \"0.2\"\n").expect("w");
        assert_eq!(
            Config::load(&img, &node)
                .expect("floor")
                .min_version
                .as_deref(),
            Some("0.3")
        );
        std::fs::write(&node, "min-version = \"0.4\"\n").expect("w");
        assert_eq!(
            Config::load(&img, &node)
                .expect("floor")
                .min_version
                .as_deref(),
            Some("0.4")
        );
    }

    #[test]
    fn bad_settings_name_file_and_field() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("u.toml");
        std::fs::write(&p, "tries = 0\n").expect("w");
        let e = Config::load(&p, Path::new("/nonexistent")).expect_err("tries 0");
        assert!(e.to_string().contains("tries = 0"), "{e}");
        std::fs::write(&p, "repository = \"ftp://x/\"\n").expect("w");
        let e = Config::load(&p, Path::new("/nonexistent")).expect_err("scheme");
        assert!(e.to_string().contains("u.toml: repository"), "{e}");
        std::fs::write(&p, "colour = 1\n").expect("w");
        let e = Config::load(&p, Path::new("/nonexistent")).expect_err("unknown");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
