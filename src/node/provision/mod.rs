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
    if let Some(s) = apply::stamp(root)? {
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
        let left: Vec<_> = std::fs::read_dir(root.join("var/lib/keel"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("provisioned.json")],
            "no temporary file left"
        );
        match run(&root, &sources).expect("second boot") {
            Outcome::AlreadyProvisioned(s) => assert_eq!(s.source, "none"),
            other => panic!("expected AlreadyProvisioned, got {other:?}"),
        }
    }

    fn sources(t: &Path) -> source::Sources {
        let esp = t.join("esp");
        std::fs::create_dir_all(&esp).expect("mkdir");
        // A config is there: were the stamp read as "not provisioned", it would be applied.
        std::fs::write(
            esp.join("config.ign"),
            br#"{"ignition":{"version":"3.4.0"}}"#,
        )
        .expect("config");
        source::Sources {
            fw_cfg: t.join("no-fw-cfg"),
            esp: Some(esp),
        }
    }

    /// A corrupt or unreadable stamp stops provisioning with an error naming the file; it is
    /// never taken for "not provisioned yet" (which would apply a config over a running node).
    #[test]
    fn a_corrupt_or_unreadable_stamp_is_an_error_not_a_fresh_node() {
        for (case, content) in [
            ("truncated JSON", &b"{\"sha256\": \"ab"[..]),
            ("empty file", &b""[..]),
            ("wrong shape", &b"[1, 2]"[..]),
        ] {
            let t = tempfile::tempdir().expect("tempdir");
            let root = t.path().join("sysroot");
            std::fs::create_dir_all(root.join("var/lib/keel")).expect("mkdir");
            std::fs::write(root.join(apply::STAMP), content).expect("stamp");
            let e = run(&root, &sources(t.path())).expect_err(case);
            let shown = format!("{e:#}");
            assert!(shown.contains("provisioned.json"), "{case}: {shown}");
            assert!(shown.contains("corrupt"), "{case}: {shown}");
            assert!(
                !root.join("etc").exists()
                    && !root.join("var/lib/keel/.provision-staging").exists(),
                "{case}: nothing applied or staged"
            );
            assert_eq!(
                std::fs::read(root.join(apply::STAMP)).expect("kept"),
                content,
                "{case}: the stamp is left as it was"
            );
        }
        // A directory where the file should be: unreadable, also an error.
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("sysroot");
        std::fs::create_dir_all(root.join(apply::STAMP)).expect("mkdir");
        let e = run(&root, &sources(t.path())).expect_err("unreadable");
        assert!(
            format!("{e:#}").contains("cannot read the provisioning stamp"),
            "{e:#}"
        );
    }
}
