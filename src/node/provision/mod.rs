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

/// The word measured into [`PCR`] for a config hash (empty: the node has no config).
pub fn measurement(sha256: &str) -> String {
    if sha256.is_empty() {
        "keel-ignition:none".to_string()
    } else {
        format!("keel-ignition:sha256:{sha256}")
    }
}

/// PCR 12 (sha256) after the initrd on a node whose provisioning recorded `stamp` (`None`: never
/// provisioned, nothing measured): the one measurement of [`measurement`] on a zero PCR.
pub fn expected_pcr(stamp: Option<&apply::Stamp>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut pcr = [0u8; 32];
    if let Some(s) = stamp {
        let word = measurement(&s.sha256);
        crate::trust::measure::extend(&mut pcr, &Sha256::digest(word.as_bytes()).into());
    }
    pcr
}

/// Measures a word into [`PCR`]; the seam between provisioning and the TPM.
pub type Measure<'a> = &'a mut dyn FnMut(&str) -> Result<()>;

/// Runs on every boot from the initrd with the root at `root`. On the first, applies the config
/// found by `source::find` (or records that there is none); the config's hash is measured
/// before any of it is applied, and on later boots the recorded hash is measured again. A
/// failed measurement is an error: the boot stops rather than run with PCR 12 unaccounted for.
pub fn run(root: &Path, sources: &source::Sources, measure: Measure) -> Result<Outcome> {
    if let Some(s) = apply::stamp(root)? {
        measure(&measurement(&s.sha256))?;
        return Ok(Outcome::AlreadyProvisioned(s));
    }
    if apply::roll_back(root)? {
        tracing::warn!("undid an interrupted provisioning run; starting over");
    }
    let Some(found) = source::find(sources, root)? else {
        let s = apply::Stamp {
            sha256: String::new(),
            version: String::new(),
            source: "none".into(),
        };
        measure(&measurement(""))?;
        apply::write_stamp(root, &s).context("recording that there was no config")?;
        return Ok(Outcome::NoConfig);
    };
    let from = &found.from;
    let plan =
        config::parse(&found.bytes).with_context(|| format!("Ignition config from {from}"))?;
    measure(&measurement(&plan.sha256))?;
    let stamp =
        apply::apply(root, &plan, from).with_context(|| format!("Ignition config from {from}"))?;
    if let Some(place) = &found.esp {
        // Applied and recorded: the config (and whatever secrets it carries) leaves the disk.
        if let Err(e) = source::remove_from_esp(place) {
            tracing::warn!("the applied config could not be removed from the ESP: {e:#}; remove keel/config.ign there by hand");
        }
    }
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
        let mut words = Vec::new();
        let mut m = |w: &str| {
            words.push(w.to_string());
            Ok(())
        };
        assert_eq!(
            run(&root, &sources, &mut m).expect("first boot"),
            Outcome::NoConfig
        );
        assert!(root.join(apply::STAMP).is_file());
        // Review L8: root's alone, also when no TPM made the directory first.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("var/lib/keel"))
            .expect("keel dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let left: Vec<_> = std::fs::read_dir(root.join("var/lib/keel"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("provisioned.json")],
            "no temporary file left"
        );
        match run(&root, &sources, &mut m).expect("second boot") {
            Outcome::AlreadyProvisioned(s) => assert_eq!(s.source, "none"),
            other => panic!("expected AlreadyProvisioned, got {other:?}"),
        }
        assert_eq!(words, ["keel-ignition:none", "keel-ignition:none"]);
    }

    /// Review M3: the config is measured before anything of it is written, and a measurement
    /// that fails stops provisioning with nothing applied.
    #[test]
    fn the_config_is_measured_before_it_is_applied_and_a_failed_measurement_stops() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("sysroot");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        let srcs = sources(t.path());
        let mut fail = |_: &str| -> Result<()> { anyhow::bail!("TPM gone") };
        let e = run(&root, &srcs, &mut fail).expect_err("measurement failed");
        assert!(format!("{e:#}").contains("TPM gone"), "{e:#}");
        assert!(!root.join(apply::STAMP).exists(), "nothing recorded");
        let root_seen = root.clone();
        let mut words = Vec::new();
        let mut m = |w: &str| {
            // At measurement time nothing of the config is on the root yet.
            assert!(!root_seen.join(apply::STAMP).exists());
            words.push(w.to_string());
            Ok(())
        };
        let out = run(&root, &srcs, &mut m).expect("applied");
        let Outcome::Applied(stamp) = out else {
            panic!("expected Applied, got {out:?}")
        };
        assert_eq!(words, [measurement(&stamp.sha256)]);
        assert!(words[0].starts_with("keel-ignition:sha256:"));
        assert_ne!(expected_pcr(Some(&stamp)), [0u8; 32]);
        assert_eq!(expected_pcr(None), [0u8; 32]);
    }

    /// An ESP holding an unsigned config, on a node (root `t/sysroot`) whose image allows
    /// unsigned ESP configs.
    fn sources(t: &Path) -> source::Sources {
        let settings = t.join("sysroot").join(source::SETTINGS);
        std::fs::create_dir_all(settings.parent().expect("dir")).expect("mkdir");
        std::fs::write(&settings, r#"{"unsigned-esp-configs": true}"#).expect("settings");
        let esp = t.join("esp");
        std::fs::create_dir_all(esp.join("keel")).expect("mkdir");
        // A config is there: were the stamp read as "not provisioned", it would be applied.
        std::fs::write(
            esp.join(source::ESP_PATH),
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
            let e = run(&root, &sources(t.path()), &mut |_| Ok(())).expect_err(case);
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
        let e = run(&root, &sources(t.path()), &mut |_| Ok(())).expect_err("unreadable");
        assert!(
            format!("{e:#}").contains("cannot read the provisioning stamp"),
            "{e:#}"
        );
    }

    /// Review C2 (a): a root volume the TPM did not open carries a roll-back journal naming
    /// initrd files (absolute paths, `..`, a backup outside staging). Provisioning runs on such a
    /// root, undoes "its" interrupted run, and must touch nothing outside the root.
    #[test]
    fn a_planted_roll_back_journal_touches_nothing_outside_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let initrd = t.path().join("initrd");
        let pcrextend = initrd.join("usr/lib/systemd/systemd-pcrextend");
        std::fs::create_dir_all(pcrextend.parent().expect("dir")).expect("mkdir");
        std::fs::write(&pcrextend, "binary").expect("write");
        std::fs::write(initrd.join("a"), "A").expect("write");
        std::fs::create_dir(initrd.join("emptydir")).expect("mkdir");
        let root = t.path().join("sysroot");
        let staging = root.join("var/lib/keel/.provision-staging");
        std::fs::create_dir_all(staging.join("backup")).expect("mkdir");
        let i = initrd.display();
        let plan = format!(
            r#"{{"moves":[],"dirs":[],"created_dirs":["{i}/emptydir","../initrd/emptydir"],"backups":[["{i}/renamed","{i}/a"],["x","../../../../../initrd/a"]],"placed":["{i}/usr/lib/systemd/systemd-pcrextend","../../initrd/usr/lib/systemd/systemd-pcrextend"]}}"#
        );
        std::fs::write(staging.join("plan.json"), plan).expect("plan");
        run(&root, &sources(t.path()), &mut |_| Ok(())).expect("provisioning runs");
        assert!(pcrextend.exists(), "an initrd file was removed");
        assert_eq!(std::fs::read_to_string(initrd.join("a")).expect("a"), "A");
        assert!(
            !initrd.join("renamed").exists(),
            "a rename outside the root"
        );
        assert!(
            initrd.join("emptydir").is_dir(),
            "a directory outside the root removed"
        );
        // Through a link inside the root: resolved as if the root were `/`, so the absolute
        // link target is looked up inside the root, where it does not exist.
        let t2 = tempfile::tempdir().expect("tempdir");
        let root2 = t2.path().join("sysroot");
        let staging2 = root2.join("var/lib/keel/.provision-staging");
        std::fs::create_dir_all(&staging2).expect("mkdir");
        std::os::unix::fs::symlink(&initrd, root2.join("var/escape")).expect("link");
        std::fs::write(
            staging2.join("plan.json"),
            r#"{"moves":[],"dirs":[],"placed":["var/escape/usr/lib/systemd/systemd-pcrextend"]}"#,
        )
        .expect("plan");
        run(&root2, &sources(t2.path()), &mut |_| Ok(())).expect("provisioning runs");
        assert!(pcrextend.exists(), "removed through a link in the root");
    }

    /// Review C2 (second primitive): /var/lib/keel on the root is a link to a directory outside
    /// it. The stamp is never written through it; provisioning stops with the reason.
    #[test]
    fn the_stamp_is_never_written_through_a_link_out_of_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("initrd-etc");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let root = t.path().join("sysroot");
        std::fs::create_dir_all(root.join("var/lib")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("var/lib/keel")).expect("link");
        let e = run(&root, &sources(t.path()), &mut |_| Ok(())).expect_err("refused");
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert!(!outside.join("provisioned.json").exists());
        assert_eq!(std::fs::read_dir(&outside).expect("list").count(), 0);
    }

    /// Review H1: on an image that does not allow unsigned ESP configs, an unsigned config and
    /// one signed by another key are each refused naming why, with nothing written; the
    /// operator's signature is applied, and the config leaves the ESP once applied.
    #[test]
    fn esp_configs_must_carry_the_operators_signature() {
        use crate::container::{policy, signature};
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("sysroot");
        std::fs::create_dir_all(root.join("etc")).expect("etc");
        let pdir = root.join(policy::POLICY_DIR);
        std::fs::create_dir_all(&pdir).expect("policy dir");
        let ops = signature::generate_key().expect("key");
        let other = signature::generate_key().expect("key");
        std::fs::write(
            pdir.join("ops.pub.pem"),
            ops.public_key_to_pem().expect("pem"),
        )
        .expect("pub");
        std::fs::write(
            pdir.join(policy::POLICY_FILE),
            r#"{"keys":["ops.pub.pem"],"require-trusted-boot":true,"require-enrolled-machines":false,"cluster":"c"}"#,
        )
        .expect("policy");
        let esp = t.path().join("esp");
        std::fs::create_dir_all(esp.join("keel")).expect("esp");
        let config = br#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/etc/marker","contents":{"source":"data:,signed"}}]}}"#;
        std::fs::write(esp.join(source::ESP_PATH), config).expect("config");
        let srcs = source::Sources {
            fw_cfg: t.path().join("no-fw-cfg"),
            esp: Some(esp.clone()),
        };
        let e = run(&root, &srcs, &mut |_| Ok(())).expect_err("unsigned");
        assert!(format!("{e:#}").contains("is not signed"), "{e:#}");
        assert!(!root.join("etc/marker").exists() && !root.join(apply::STAMP).exists());
        let sig = |k: &openssl::pkey::PKey<openssl::pkey::Private>, bytes: &[u8]| {
            signature::sign(&source::signed_payload(bytes), k).expect("sign")
        };
        std::fs::write(esp.join(source::ESP_SIG_PATH), sig(&other, config)).expect("sig");
        let e = run(&root, &srcs, &mut |_| Ok(())).expect_err("foreign key");
        assert!(format!("{e:#}").contains("does not verify"), "{e:#}");
        assert!(!root.join("etc/marker").exists() && !root.join(apply::STAMP).exists());
        // A signature over the bare config (no domain prefix), e.g. a cosign blob signature of
        // the same bytes made for another purpose, is not a config signature.
        let bare = signature::sign(config, &ops).expect("sign");
        std::fs::write(esp.join(source::ESP_SIG_PATH), bare).expect("sig");
        assert!(run(&root, &srcs, &mut |_| Ok(())).is_err());
        std::fs::write(esp.join(source::ESP_SIG_PATH), sig(&ops, config)).expect("sig");
        let out = run(&root, &srcs, &mut |_| Ok(())).expect("signed: applied");
        assert!(matches!(out, Outcome::Applied(_)), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/marker")).expect("marker"),
            "signed"
        );
        assert!(!esp.join(source::ESP_PATH).exists() && !esp.join(source::ESP_SIG_PATH).exists());
    }
}
