//! `keel-agent boot-state`: is this node in a boot state the operator signed?
//!
//! Reads PCR 11 from the TPM, replays the firmware and systemd event logs to it, and looks the
//! value's PolicyPCR digest up in the running UKI's `.pcrsig` (which the stub hands to the initrd
//! and tmpfiles copies to /run/systemd), verifying the signature with the operator's boot key
//! shipped in the verity-protected /usr. PCR 12 must hold exactly the provisioning measurement
//! the node's recorded config gives (anything else there is a command line, credential or addon
//! from outside the UKI, or another config), and PCR 13 nothing (no system extensions). The
//! decision is a pure function of those inputs.

use crate::trust::eventlog::{self, Event, UserEvent};
use crate::trust::keys::public_from_pem;
use crate::trust::measure::{self, PcrSig};
use serde::Serialize;
use std::path::Path;

/// Where the inputs live, relative to the node's root.
pub const FIRMWARE_LOG: &str = "sys/kernel/security/tpm0/binary_bios_measurements";
pub const USERSPACE_LOG: &str = "run/log/systemd/tpm2-measure.log";
pub const PCRSIG: &str = "run/systemd/tpm2-pcr-signature.json";
pub const TRUST_DIR: &str = "usr/lib/keel/trust";
pub const TRUSTED_KEYS: &[&str] = &["pcr-initrd.pub.pem", "pcr-boot.pub.pem"];
/// The key whose signatures make a running system trusted. The initrd key signs only the state in
/// which the TPM releases the root's key; a running system found in that state skipped a
/// measurement.
pub const BOOT_KEY: &str = "pcr-boot.pub.pem";

/// A public key the operator trusts, with its `pkfp`.
pub struct TrustedKey {
    pub file: String,
    pub fingerprint: String,
    pub key: openssl::pkey::PKey<openssl::pkey::Public>,
}

/// Everything the verdict depends on.
pub struct Inputs<'a> {
    pub pcr11: [u8; 32],
    /// PCR 12 as the TPM reports it, and the value the recorded provisioning gives.
    pub pcr12: [u8; 32],
    pub expected_pcr12: [u8; 32],
    /// PCR 13 (system extensions the stub measured).
    pub pcr13: [u8; 32],
    pub firmware: &'a [Event],
    pub userspace: &'a [UserEvent],
    pub pcrsig: Option<&'a PcrSig>,
    pub keys: &'a [TrustedKey],
}

/// PCRs reported besides 11: firmware code (0), boot loader code (4), Secure Boot policy (7),
/// kernel command line from outside the UKI (12), system extensions (13), volume keys and
/// machine identity (15).
pub const REPORTED_PCRS: &[u32] = &[0, 4, 7, 11, 12, 13, 15];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootState {
    /// PCR 11, sha256 bank, as the TPM reports it.
    pub pcr11: String,
    /// Every reported PCR (sha256 bank), by index.
    pub pcrs: std::collections::BTreeMap<u32, String>,
    /// PCR 11 replayed from the event logs.
    pub replayed: String,
    pub replay_matches: bool,
    /// Stub section events (firmware log) and phase words (systemd log) replayed.
    pub firmware_events: usize,
    pub phases: Vec<String>,
    /// The phase path the logs say the system is in (e.g. `enter-initrd:leave-initrd:sysinit`).
    pub phase: String,
    /// The key file whose signed policy matches the current PCR 11, if any.
    pub signed_by: Option<String>,
    /// PCR 12 equals the value the recorded provisioning config gives.
    pub pcr12_matches: bool,
    /// PCR 12's expected value (hex).
    pub expected_pcr12: String,
    /// True when the logs explain PCR 11 and the operator signed this exact state.
    pub trusted: bool,
    /// Why not, in words an operator can act on.
    pub problems: Vec<String>,
}

pub fn evaluate(i: &Inputs) -> BootState {
    let mut problems = Vec::new();
    let (replayed, firmware_events, phases) = match eventlog::replay(11, i.firmware, i.userspace) {
        Ok(r) => (r.value, r.firmware_events, r.userspace_events),
        Err(e) => {
            problems.push(format!("event log replay failed: {e}"));
            ([0u8; 32], 0, vec![])
        }
    };
    let replay_matches = replayed == i.pcr11;
    if !replay_matches {
        problems.push(
            "the event logs do not replay to PCR 11: a measurement happened that is not logged"
                .into(),
        );
    }
    if firmware_events == 0 {
        problems.push("no PCR 11 events in the firmware log: not booted through a UKI".into());
    }
    let policy = hex::encode(measure::policy_pcr_digest(&i.pcr11));
    let mut signed_by = None;
    match i.pcrsig {
        None => problems.push(format!(
            "no PCR signature file (/{PCRSIG}): the running UKI carries no .pcrsig"
        )),
        Some(sig) => {
            let entries = sig.get("sha256").map(Vec::as_slice).unwrap_or_default();
            let matching: Vec<_> = entries.iter().filter(|e| e.pol == policy).collect();
            if matching.is_empty() {
                problems.push(format!(
                    "PCR 11 is in no state the UKI's .pcrsig lists (policy {policy}): the UKI, its command line or the boot phases differ from what was signed"
                ));
            }
            // A state counts as signed when any matching entry verifies with a trusted key;
            // the reasons the others did not are only worth reporting when none does.
            let mut rejected = Vec::new();
            for e in matching {
                match i.keys.iter().find(|k| k.fingerprint == e.pkfp) {
                    None => rejected.push(format!(
                        "a signature for this state is by key {}, which is not one of the operator's keys in /{TRUST_DIR}",
                        e.pkfp
                    )),
                    Some(k) => match measure::verify_entry(e, &k.key) {
                        Ok(true) => signed_by = Some(k.file.clone()),
                        Ok(false) | Err(_) => rejected.push(format!(
                            "the signature for this state does not verify with {}",
                            k.file
                        )),
                    },
                }
            }
            if signed_by.is_none() {
                problems.extend(rejected);
            }
        }
    }
    if signed_by.as_deref().is_some_and(|k| k != BOOT_KEY) {
        problems.push(format!(
            "PCR 11 is in the state only the initrd may be in (signed by {}, the key that releases the root volume): the measurement that marks the root as opened was skipped",
            signed_by.as_deref().unwrap_or_default()
        ));
    }
    let pcr12_matches = i.pcr12 == i.expected_pcr12;
    if !pcr12_matches {
        problems.push(format!(
            "PCR 12 is {}, not {} (the provisioning measurement of the config recorded in /{}): a kernel command line, credential or addon from outside the UKI was measured, or another config was applied",
            hex::encode(i.pcr12),
            hex::encode(i.expected_pcr12),
            crate::node::provision::apply::STAMP
        ));
    }
    if i.pcr13 != [0u8; 32] {
        problems.push(format!(
            "PCR 13 is {}, not zero: system extensions from outside the image were measured",
            hex::encode(i.pcr13)
        ));
    }
    let trusted = replay_matches
        && firmware_events > 0
        && signed_by.as_deref() == Some(BOOT_KEY)
        && pcr12_matches
        && i.pcr13 == [0u8; 32];
    BootState {
        pcr11: hex::encode(i.pcr11),
        pcrs: std::collections::BTreeMap::new(),
        replayed: hex::encode(replayed),
        replay_matches,
        firmware_events,
        phase: phases.join(":"),
        phases,
        signed_by,
        pcr12_matches,
        expected_pcr12: hex::encode(i.expected_pcr12),
        trusted,
        problems,
    }
}

/// Loads the operator's keys from `root`/usr/lib/keel/trust.
pub fn load_keys(root: &Path) -> anyhow::Result<Vec<TrustedKey>> {
    use anyhow::Context;
    let mut keys = Vec::new();
    for f in TRUSTED_KEYS {
        let path = root.join(TRUST_DIR).join(f);
        let pem = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (an image built without [trust]?)",
                path.display()
            )
        })?;
        let key = public_from_pem(&pem).with_context(|| format!("parsing {}", path.display()))?;
        keys.push(TrustedKey {
            file: f.to_string(),
            fingerprint: measure::key_fingerprint(&key)?,
            key,
        });
    }
    Ok(keys)
}

/// Gathers the inputs from the node (files under `root`, PCR 11 from the TPM) and evaluates.
pub fn read(root: &Path) -> anyhow::Result<BootState> {
    use anyhow::Context;
    let keys = load_keys(root)?;
    let pcrs = super::tpm::read_pcrs_sha256(REPORTED_PCRS)?;
    let pcr = |n: u32| {
        pcrs.iter()
            .find(|(i, _)| *i == n)
            .map(|(_, v)| *v)
            .with_context(|| format!("the TPM returned no PCR {n}"))
    };
    let (pcr11, pcr12, pcr13) = (pcr(11)?, pcr(12)?, pcr(13)?);
    let stamp = crate::node::provision::apply::stamp(root)?;
    let expected_pcr12 = crate::node::provision::expected_pcr(stamp.as_ref());
    let fw_path = root.join(FIRMWARE_LOG);
    let fw = std::fs::read(&fw_path)
        .with_context(|| format!("reading the firmware event log {}", fw_path.display()))?;
    let firmware =
        eventlog::parse_tcg2(&fw).with_context(|| format!("parsing {}", fw_path.display()))?;
    let user_path = root.join(USERSPACE_LOG);
    let user_text = std::fs::read_to_string(&user_path).unwrap_or_default();
    let userspace = eventlog::parse_userspace(&user_text)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", user_path.display()))?;
    let sig_path = root.join(PCRSIG);
    let pcrsig = match std::fs::read_to_string(&sig_path) {
        Ok(t) => Some(
            measure::parse_pcrsig(&t).with_context(|| format!("parsing {}", sig_path.display()))?,
        ),
        Err(_) => None,
    };
    let mut state = evaluate(&Inputs {
        pcr11,
        pcr12,
        expected_pcr12,
        pcr13,
        firmware: &firmware,
        userspace: &userspace,
        pcrsig: pcrsig.as_ref(),
        keys: &keys,
    });
    state.pcrs = pcrs.iter().map(|(i, v)| (*i, hex::encode(v))).collect();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::eventlog::EV_IPL;
    use sha2::{Digest, Sha256};

    struct Case {
        firmware: Vec<Event>,
        userspace: Vec<UserEvent>,
        pcr11: [u8; 32],
        pcrsig: PcrSig,
        keys: Vec<TrustedKey>,
        pcr12: [u8; 32],
        expected_pcr12: [u8; 32],
        pcr13: [u8; 32],
    }

    fn key() -> openssl::pkey::PKey<openssl::pkey::Private> {
        openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pk")
    }

    fn trusted(k: &openssl::pkey::PKey<openssl::pkey::Private>, file: &str) -> TrustedKey {
        let pem = k.public_key_to_pem().expect("pem");
        let key = public_from_pem(&pem).expect("pub");
        TrustedKey {
            file: file.into(),
            fingerprint: measure::key_fingerprint(&key).expect("fp"),
            key,
        }
    }

    /// A node that booted a UKI with one section, signed with `signer`, now in `phase`.
    fn case(signer: &openssl::pkey::PKey<openssl::pkey::Private>, trust: &[TrustedKey]) -> Case {
        let sections = vec![measure::MeasuredSection {
            name: ".linux".into(),
            digest: Sha256::digest(b"kernel").into(),
        }];
        let preds = measure::predict(&sections);
        let sig = measure::sign_phases(&preds, measure::PHASES, signer).expect("sign");
        let mut pcrsig = PcrSig::new();
        pcrsig.insert("sha256".into(), sig);
        let firmware = vec![
            Event {
                pcr: 11,
                event_type: EV_IPL,
                sha256: Some(Sha256::digest(b".linux\0").into()),
                data: vec![],
            },
            Event {
                pcr: 11,
                event_type: EV_IPL,
                sha256: Some(sections[0].digest),
                data: vec![],
            },
        ];
        let userspace = [
            "enter-initrd",
            "keel-root-opened",
            "leave-initrd",
            "sysinit",
        ]
        .iter()
        .map(|w| UserEvent {
            pcr: 11,
            sha256: Some(Sha256::digest(w.as_bytes()).into()),
            description: w.to_string(),
        })
        .collect();
        let pcr11: [u8; 32] = hex::decode(&preds[3].sha256)
            .expect("hex")
            .try_into()
            .expect("32");
        Case {
            firmware,
            userspace,
            pcr11,
            pcrsig,
            keys: trust.iter().map(trusted_clone).collect(),
            pcr12: expected_pcr12(),
            expected_pcr12: expected_pcr12(),
            pcr13: [0; 32],
        }
    }

    /// PCR 12 after provisioning measured config `ab…`.
    fn expected_pcr12() -> [u8; 32] {
        crate::node::provision::expected_pcr(Some(&crate::node::provision::apply::Stamp {
            sha256: "ab".repeat(32),
            version: "3.4.0".into(),
            source: "fw_cfg".into(),
        }))
    }

    fn trusted_clone(t: &TrustedKey) -> TrustedKey {
        TrustedKey {
            file: t.file.clone(),
            fingerprint: t.fingerprint.clone(),
            key: t.key.clone(),
        }
    }

    fn run(c: &Case) -> BootState {
        evaluate(&Inputs {
            pcr11: c.pcr11,
            pcr12: c.pcr12,
            expected_pcr12: c.expected_pcr12,
            pcr13: c.pcr13,
            firmware: &c.firmware,
            userspace: &c.userspace,
            pcrsig: Some(&c.pcrsig),
            keys: &c.keys,
        })
    }

    #[test]
    fn signed_state_is_trusted() {
        let k = key();
        let c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        let s = run(&c);
        assert!(s.trusted, "{s:?}");
        assert_eq!(
            s.phase,
            "enter-initrd:keel-root-opened:leave-initrd:sysinit"
        );
        assert_eq!(s.signed_by.as_deref(), Some("pcr-boot.pub.pem"));
    }

    #[test]
    fn states_that_must_not_be_trusted() {
        let k = key();
        let other = key();
        // Signed by a key the image does not trust.
        let s = run(&case(&other, &[trusted(&k, "pcr-boot.pub.pem")]));
        assert!(
            !s.trusted
                && s.problems
                    .iter()
                    .any(|p| p.contains("not one of the operator's keys")),
            "{s:?}"
        );
        // PCR 11 holds something unlogged.
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        c.pcr11[0] ^= 1;
        let s = run(&c);
        assert!(!s.trusted && !s.replay_matches, "{s:?}");
        assert!(s
            .problems
            .iter()
            .any(|p| p.contains("no state the UKI's .pcrsig lists")));
        // A signature that was tampered with.
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        for e in c.pcrsig.get_mut("sha256").expect("bank") {
            e.sig = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 256]);
        }
        let s = run(&c);
        assert!(
            !s.trusted && s.problems.iter().any(|p| p.contains("does not verify")),
            "{s:?}"
        );
        // No firmware events: not a UKI boot.
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        c.firmware.clear();
        assert!(!run(&c).trusted);
    }

    /// Review C1: with Secure Boot off, the signed UKI started with a command line of the
    /// attacker's leaves PCR 11 as signed but extends PCR 12 (systemd-stub measures overrides,
    /// credentials and addons there): not trusted. Likewise system extensions in PCR 13, and a
    /// PCR 12 with no config measured although one is recorded.
    #[test]
    fn an_outside_command_line_or_extension_is_not_trusted() {
        let k = key();
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        let mut attacked = c.expected_pcr12;
        crate::trust::measure::extend(&mut attacked, &Sha256::digest(b"init=/bin/sh").into());
        c.pcr12 = attacked;
        let s = run(&c);
        assert!(!s.trusted && !s.pcr12_matches, "{s:?}");
        assert!(s.problems.iter().any(|p| p.contains("PCR 12 is")), "{s:?}");
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        c.pcr12 = [0; 32];
        assert!(!run(&c).trusted, "a config recorded but never measured");
        let mut c = case(&k, &[trusted(&k, "pcr-boot.pub.pem")]);
        c.pcr13[5] = 1;
        let s = run(&c);
        assert!(
            !s.trusted && s.problems.iter().any(|p| p.contains("PCR 13")),
            "{s:?}"
        );
    }

    /// Review C2(d): a running system whose PCR 11 is still in the initrd's sealing state (the
    /// `keel-root-opened` measurement skipped) matches a signature by the initrd key, which must
    /// not make it trusted. A recovery boot (`keel-recovery` before `keel-root-opened`) is in no
    /// signed state at all.
    #[test]
    fn the_sealing_state_and_recovery_boots_are_not_trusted() {
        let initrd = key();
        let boot = key();
        let trust = [
            trusted(&initrd, "pcr-initrd.pub.pem"),
            trusted(&boot, "pcr-boot.pub.pem"),
        ];
        let mut c = case(&boot, &trust);
        let sections = vec![measure::MeasuredSection {
            name: ".linux".into(),
            digest: Sha256::digest(b"kernel").into(),
        }];
        let preds = measure::predict(&sections);
        c.pcrsig
            .get_mut("sha256")
            .expect("bank")
            .extend(measure::sign_phases(&preds, &["enter-initrd"], &initrd).expect("sign"));
        c.userspace.truncate(1);
        c.pcr11 = hex::decode(&preds[0].sha256)
            .expect("hex")
            .try_into()
            .expect("32");
        let s = run(&c);
        assert_eq!(s.signed_by.as_deref(), Some("pcr-initrd.pub.pem"));
        assert!(!s.trusted, "{s:?}");
        assert!(
            s.problems.iter().any(|p| p.contains("was skipped")),
            "{s:?}"
        );
        // Recovery: keel-recovery measured before the root was opened.
        let mut c = case(&boot, &trust);
        let base = measure::pcr11_after_stub(&sections);
        let phase = "enter-initrd:keel-recovery:keel-root-opened:leave-initrd:sysinit";
        c.pcr11 = measure::pcr11_at_phase(&base, phase);
        c.userspace = phase
            .split(':')
            .map(|w| UserEvent {
                pcr: 11,
                sha256: Some(Sha256::digest(w.as_bytes()).into()),
                description: w.to_string(),
            })
            .collect();
        let s = run(&c);
        assert!(
            s.replay_matches && !s.trusted && s.signed_by.is_none(),
            "{s:?}"
        );
    }
}
