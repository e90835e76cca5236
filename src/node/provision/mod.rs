//! First-boot provisioning from Ignition configs (spec 3.x): `config` turns a config into a
//! checked plan (also used by `keel ignition validate`), `apply` writes it into the node's root
//! all or nothing, `source` finds the config (QEMU fw_cfg, else the ESP), and [`run`] is what
//! `keel-agent provision` does in the initrd. See docs/provisioning.md.

pub mod apply;
pub mod config;
pub mod source;

use anyhow::{Context, Result};
use std::path::Path;

/// PCR that receives the applied config's hash on every boot (see docs/provisioning.md).
pub const PCR: u32 = 12;

/// What the initrd step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Provisioning ran before (stamp present); its config hash was measured again.
    AlreadyProvisioned(apply::Stamp),
    /// No config anywhere: the node boots unconfigured (and stays so).
    NoConfig,
    /// The config was applied.
    Applied(apply::Stamp),
}

/// The word measured into [`PCR`] for a config hash.
pub fn measurement(sha256: &str) -> String {
    format!("keel-ignition:sha256:{sha256}")
}

/// Runs once per machine from the initrd with the new root at `root`: applies the config found
/// by `source::find` (or notes that there is none) and measures the applied config's hash.
pub fn run(root: &Path, sources: &source::Sources) -> Result<Outcome> {
    if let Some(s) = apply::stamp(root) {
        return Ok(Outcome::AlreadyProvisioned(s));
    }
    if apply::roll_back(root)? {
        tracing::warn!("undid an interrupted provisioning run; starting over");
    }
    let Some((bytes, from)) = source::find(sources)? else {
        let s = apply::Stamp {
            sha256: String::new(),
            version: String::new(),
            source: "none".into(),
        };
        apply::write_stamp(root, &s).context("recording that there was no config")?;
        return Ok(Outcome::NoConfig);
    };
    let plan = config::parse(&bytes).with_context(|| format!("Ignition config from {from}"))?;
    let stamp =
        apply::apply(root, &plan, &from).with_context(|| format!("Ignition config from {from}"))?;
    Ok(Outcome::Applied(stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root created on this boot without a TPM (or by systemd-repart for an image without
    /// [trust]) has no /var/lib/keel yet: the first boot without a config must still record it.
    #[test]
    fn no_config_on_a_fresh_root_is_recorded_once() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("sysroot");
        let esp = t.path().join("esp");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&esp).expect("mkdir");
        let sources = source::Sources {
            fw_cfg: t.path().join("no-fw-cfg"),
            esp: Some(esp),
        };
        assert_eq!(run(&root, &sources).expect("first boot"), Outcome::NoConfig);
        assert!(root.join(apply::STAMP).is_file());
        assert!(
            !root.join(apply::STAMP).with_extension("json.new").exists(),
            "no temporary file left"
        );
        match run(&root, &sources).expect("second boot") {
            Outcome::AlreadyProvisioned(s) => assert_eq!(s.source, "none"),
            other => panic!("expected AlreadyProvisioned, got {other:?}"),
        }
    }
}
