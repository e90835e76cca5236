//! `keel-agent boot-state`: is this node in a boot state the operator signed?
//!
//! Reads PCR 11 from the TPM, replays the firmware and systemd event logs to it, and looks the
//! value's PolicyPCR digest up in the running UKI's `.pcrsig` (which the stub hands to the initrd
//! and tmpfiles copies to /run/systemd), verifying the signature with the operator's public keys
//! shipped in the verity-protected /usr. The decision is a pure function of those inputs.

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

/// A public key the operator trusts, with its `pkfp`.
pub struct TrustedKey {
    pub file: String,
    pub fingerprint: String,
    pub key: openssl::pkey::PKey<openssl::pkey::Public>,
}

/// Everything the verdict depends on.
pub struct Inputs<'a> {
    pub pcr11: [u8; 32],
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
    let trusted = replay_matches && firmware_events > 0 && signed_by.is_some();
    BootState {
        pcr11: hex::encode(i.pcr11),
        pcrs: std::collections::BTreeMap::new(),
        replayed: hex::encode(replayed),
        replay_matches,
        firmware_events,
        phase: phases.join(":"),
        phases,
        signed_by,
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
    let pcr11 = pcrs
        .iter()
        .find(|(i, _)| *i == 11)
        .map(|(_, v)| *v)
        .context("the TPM returned no PCR 11")?;
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
        let userspace = ["enter-initrd", "leave-initrd", "sysinit"]
            .iter()
            .map(|w| UserEvent {
                pcr: 11,
                sha256: Some(Sha256::digest(w.as_bytes()).into()),
                description: w.to_string(),
            })
            .collect();
        let pcr11: [u8; 32] = hex::decode(&preds[2].sha256)
            .expect("hex")
            .try_into()
            .expect("32");
        Case {
            firmware,
            userspace,
            pcr11,
            pcrsig,
            keys: trust.iter().map(trusted_clone).collect(),
        }
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
        assert_eq!(s.phase, "enter-initrd:leave-initrd:sysinit");
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
}
