//! The admission list: which machines may join the cluster, as what, at which address, and
//! which boot states are no longer admitted. The operator signs it with the cluster's CA key
//! (`admission.json` and `admission.json.sig`, base64 ECDSA P-256 over the file's bytes, as
//! cosign's sign-blob writes); verifiers check it with the CA certificate every node already
//! holds, so no other key is needed and only the holder of the cluster's root can change who
//! is in it. A verifier takes the valid list with the highest serial it has seen.

use openssl::pkey::{PKey, Private, Public};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A client of the cluster store (keel-net, containers' nodes): client certificates only.
    Client,
    /// An etcd member: server, peer and client certificates.
    Member,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Entry {
    pub name: String,
    /// `sha256:<hex>` of the EK's DER SubjectPublicKeyInfo (`keel-agent ek` prints it).
    pub ek_sha256: String,
    /// The address the node's certificate names (etcd checks a peer's address against it).
    pub ip: IpAddr,
    pub role: Role,
    /// When set, the provisioning config (sha256 as measured into PCR 12) the node must run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// The overlay subnet assigned to this machine: etcd lets it write that lease key only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<ipnet::Ipv4Net>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Admission {
    pub cluster: String,
    /// Raised on every change; a verifier never goes back to a lower serial.
    pub serial: u64,
    /// Lifetime of the certificates verifiers issue, in seconds.
    pub cert_ttl: u64,
    pub machines: Vec<Entry>,
    /// PCR 11 values (hex) no longer admitted: boot states of images the operator withdrew.
    #[serde(default)]
    pub deny_pcr11: Vec<String>,
    /// Admit machines that booted without Secure Boot, or whose db trusts other keys than the
    /// operator's. Off by default: on such a machine anyone who boots their own code can extend
    /// PCR 11 to a signed state by hand (docs/attestation.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_secure_boot_off: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("the admission list's signature does not verify with the cluster CA's key")]
    BadSignature,
    #[error("the admission list does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the admission list is not valid: {0}")]
    Invalid(String),
    #[error("signing the admission list: {0}")]
    Sign(String),
}

impl Admission {
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// Names unique, EK hashes unique and well-formed, lifetime between a minute and a year.
    pub fn check(&self) -> Result<(), AdmissionError> {
        let bad = |m: String| Err(AdmissionError::Invalid(m));
        if !(60..=366 * 86400).contains(&self.cert_ttl) {
            return bad(format!(
                "cert-ttl {} s: between 60 s and a year",
                self.cert_ttl
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut eks = std::collections::BTreeSet::new();
        let mut ips = std::collections::BTreeSet::new();
        for m in &self.machines {
            if m.name.is_empty() || m.name.len() > 64 || !m.name.chars().all(name_char) {
                return bad(format!(
                    "machine name `{}`: 1 to 64 of a-z, 0-9, `-`, `.`",
                    m.name
                ));
            }
            if RESERVED_NAMES.contains(&m.name.as_str()) {
                return bad(format!(
                    "machine name `{}` is reserved: etcd takes a certificate's name as its user, and `{}` is the operator's",
                    m.name, m.name
                ));
            }
            crate::container::policy::check_ek(&m.ek_sha256).or_else(&bad)?;
            if !names.insert(&m.name) {
                return bad(format!("machine `{}` is listed twice", m.name));
            }
            if !eks.insert(&m.ek_sha256) {
                return bad(format!("EK {} is listed twice", m.ek_sha256));
            }
            // A verifier lets an address through to a handshake, and a certificate names it:
            // one machine per address.
            if !ips.insert(m.ip) {
                return bad(format!("address {} is listed twice ({})", m.ip, m.name));
            }
            if let Some(net) = &m.subnet {
                if net.network() != net.addr() {
                    return bad(format!("{}: subnet {net} is not a network address", m.name));
                }
                if let Some(other) = self.machines.iter().find(|o| {
                    o.name != m.name
                        && o.subnet
                            .is_some_and(|s| s.contains(net) || net.contains(&s))
                }) {
                    return bad(format!(
                        "{} and {} are assigned overlapping subnets",
                        m.name, other.name
                    ));
                }
            }
            if let Some(c) = &m.config_sha256 {
                if !is_sha256_hex(c) {
                    return bad(format!(
                        "{}: config-sha256 `{c}` is not 64 lower-case hex digits",
                        m.name
                    ));
                }
            }
        }
        // A deny-list entry written any other way would never match, and the withdrawn image
        // would still be admitted.
        if let Some(d) = self.deny_pcr11.iter().find(|d| !is_sha256_hex(d)) {
            return bad(format!(
                "deny-pcr11 `{d}` is not a PCR value (64 lower-case hex digits)"
            ));
        }
        Ok(())
    }

    /// Parses and verifies a signed list.
    pub fn from_signed(
        bytes: &[u8],
        sig_base64: &str,
        ca: &PKey<Public>,
    ) -> Result<Admission, AdmissionError> {
        use base64::Engine;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig_base64.trim())
            .map_err(|_| AdmissionError::BadSignature)?;
        let ok = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), ca)
            .and_then(|mut v| v.verify_oneshot(&sig, bytes))
            .unwrap_or(false);
        if !ok {
            return Err(AdmissionError::BadSignature);
        }
        let a: Admission = serde_json::from_slice(bytes)?;
        a.check()?;
        Ok(a)
    }

    /// The list's bytes and their signature by the CA key.
    pub fn sign(&self, ca_key: &PKey<Private>) -> Result<(Vec<u8>, String), AdmissionError> {
        use base64::Engine;
        self.check()?;
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        let sig = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), ca_key)
            .and_then(|mut s| s.sign_oneshot_to_vec(&bytes))
            .map_err(|e| AdmissionError::Sign(e.to_string()))?;
        Ok((bytes, base64::engine::general_purpose::STANDARD.encode(sig)))
    }
}

/// Names no machine may have: etcd takes a client certificate's CN as its user name, and these
/// are the cluster's administrators (`keel cluster init` writes `admin.pem`; etcd's `root`).
pub const RESERVED_NAMES: &[&str] = &["root", "admin"];

/// The etcd key a new signed list is published under; verifiers poll it and keep the newest
/// valid list on their own disk, so they never need etcd to decide.
pub const ETCD_KEY: &str = "/keel/attest/admission";

/// A signed list as one document (`admission.bundle.json`): the form it travels in through etcd
/// and is kept in on a verifier, so the list and its signature are always written together.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The list's exact bytes, as signed.
    pub list: String,
    /// Base64 signature over `list` by the cluster CA's key.
    pub signature: String,
}

impl Bundle {
    pub fn new(list: &[u8], signature: &str) -> Result<Bundle, AdmissionError> {
        let list = String::from_utf8(list.to_vec())
            .map_err(|_| AdmissionError::Invalid("the list is not UTF-8 text".into()))?;
        Ok(Bundle {
            list,
            signature: signature.trim().to_string(),
        })
    }

    /// Parses a bundle and verifies the list inside it.
    pub fn open(bytes: &[u8], ca: &PKey<Public>) -> Result<Admission, AdmissionError> {
        let b: Bundle = serde_json::from_slice(bytes)?;
        Admission::from_signed(b.list.as_bytes(), &b.signature, ca)
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;

    fn key() -> PKey<Private> {
        let g = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("group");
        PKey::from_ec_key(EcKey::generate(&g).expect("key")).expect("pkey")
    }

    fn public(k: &PKey<Private>) -> PKey<Public> {
        PKey::public_key_from_pem(&k.public_key_to_pem().expect("pem")).expect("pub")
    }

    fn list() -> Admission {
        Admission {
            cluster: "c".into(),
            serial: 1,
            cert_ttl: 3600,
            machines: vec![Entry {
                name: "node1".into(),
                ek_sha256: format!("sha256:{}", "a".repeat(64)),
                ip: "10.77.0.1".parse().expect("ip"),
                role: Role::Member,
                config_sha256: None,
                subnet: None,
            }],
            deny_pcr11: vec![],
            allow_secure_boot_off: false,
        }
    }

    #[test]
    fn only_the_cas_signature_over_these_bytes_is_accepted() {
        let ca = key();
        let (bytes, sig) = list().sign(&ca).expect("sign");
        assert_eq!(
            Admission::from_signed(&bytes, &sig, &public(&ca)).expect("valid"),
            list()
        );
        let other = key();
        assert!(matches!(
            Admission::from_signed(&bytes, &sig, &public(&other)),
            Err(AdmissionError::BadSignature)
        ));
        let mut changed = bytes.clone();
        let i = changed.iter().position(|b| *b == b'1').expect("a digit");
        changed[i] = b'2';
        assert!(matches!(
            Admission::from_signed(&changed, &sig, &public(&ca)),
            Err(AdmissionError::BadSignature)
        ));
    }

    #[test]
    fn a_bundle_carries_the_list_and_its_signature_together() {
        let ca = key();
        let (bytes, sig) = list().sign(&ca).expect("sign");
        let b = serde_json::to_vec(&Bundle::new(&bytes, &sig).expect("bundle")).expect("json");
        assert_eq!(Bundle::open(&b, &public(&ca)).expect("valid"), list());
        assert!(matches!(
            Bundle::open(&b, &public(&key())),
            Err(AdmissionError::BadSignature)
        ));
        // A list changed on the way (a serial raised by a mirror, a machine added) is refused.
        let mut forged: Bundle = serde_json::from_slice(&b).expect("parse");
        forged.list = forged.list.replace("\"serial\": 1", "\"serial\": 9");
        assert_ne!(forged.list.as_bytes(), bytes.as_slice(), "the edit applied");
        let forged = serde_json::to_vec(&forged).expect("json");
        assert!(matches!(
            Bundle::open(&forged, &public(&ca)),
            Err(AdmissionError::BadSignature)
        ));
        assert!(Bundle::open(b"{\"list\": 1}", &public(&ca)).is_err());
    }

    #[test]
    fn duplicate_names_or_eks_and_odd_lifetimes_are_refused() {
        let mut a = list();
        a.machines.push(a.machines[0].clone());
        assert!(a.check().is_err());
        let mut a = list();
        a.cert_ttl = 5;
        assert!(a.check().is_err());
        let mut a = list();
        a.machines[0].name = "Node 1".into();
        assert!(a.check().is_err());
        for reserved in RESERVED_NAMES {
            let mut a = list();
            a.machines[0].name = (*reserved).into();
            let e = a.check().expect_err(reserved).to_string();
            assert!(e.contains("is reserved"), "{e}");
        }
        let mut a = list();
        a.deny_pcr11.push(format!("sha256:{}", "a".repeat(64)));
        assert!(
            a.check().is_err(),
            "a prefixed deny entry would never match"
        );
        let mut a = list();
        a.deny_pcr11.push("A".repeat(64));
        assert!(
            a.check().is_err(),
            "an upper-case deny entry would never match"
        );
        let mut a = list();
        a.machines[0].config_sha256 = Some("AB".repeat(32));
        assert!(a.check().is_err());
    }
}
