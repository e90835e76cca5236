//! The verifier's decisions, on plain data: a Hello becomes a challenge or a refusal, and the
//! evidence that answers the challenge becomes a certificate or a refusal. No TPM, no network
//! and no cluster store are involved: the admission list, the operator's boot key and the
//! issuer's key are all the verifier needs, so it decides while etcd is down.
//!
//! Checks, cheapest first; each refusal names what failed:
//! 1. the name is in the admission list and the EK is the one enrolled under it (before any
//!    cryptography is done for a stranger);
//! 2. the EK is the TCG default template, the AK a restricted TPM-made signing key, the
//!    certificate request signed by its own P-256 key;
//! 3. the quote is signed by that AK, over the qualifying data of this session (nonce, the
//!    secret only the enrolled TPM could release, the request, the name), over exactly the
//!    PCRs asked for, whose values are the ones sent;
//! 4. the event logs replay to the quoted PCR 11, whose state the operator's boot key signed
//!    in the node's own `.pcrsig`; PCR 12 is the one provisioning measurement of the node's
//!    config (nothing from outside the UKI); PCR 13 is empty; PCR 11 is not deny-listed.

use crate::attest::admission::{Admission, Entry, Role};
use crate::attest::protocol::{Challenge, Evidence, Hello};
use crate::attest::{qualifying_data, tpm2};
use crate::node::agent::boot_state::{self, TrustedKey};
use crate::trust::{eventlog, measure};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509NameBuilder, X509Req, X509};

/// PCRs every quote covers: firmware (0), boot loader (4), Secure Boot policy (7), the UKI and
/// boot phases (11), what came from outside the UKI and the config (12), system extensions (13),
/// volume keys and machine id (15).
pub const QUOTED_PCRS: &[u32] = boot_state::REPORTED_PCRS;

/// Backdating of certificates, for clocks slightly behind the issuer's.
pub const BACKDATE_SECS: i64 = 300;

/// Why a node was not admitted. Each is logged by the verifier and sent to the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version {0} is not supported (this verifier speaks 1)")]
    Version(u32),
    #[error("`{name}` is not in the admission list (serial {serial})")]
    UnknownName { name: String, serial: u64 },
    #[error("EK {ek} is not enrolled as {name} (admission list serial {serial})")]
    UnknownEk {
        ek: String,
        name: String,
        serial: u64,
    },
    #[error("the endorsement key is not acceptable: {0}")]
    BadEk(String),
    #[error("the attestation key is not acceptable: {0}")]
    BadAk(String),
    #[error("the certificate request is not acceptable: {0}")]
    BadCsr(String),
    #[error("the quote is refused: {0}")]
    Quote(tpm2::QuoteError),
    #[error("the evidence is malformed: {0}")]
    Malformed(String),
    #[error("the boot state is not one the operator signed: {0}")]
    Untrusted(String),
    #[error("PCR 11 {0} is deny-listed in the admission list (a withdrawn image)")]
    Denied(String),
    #[error("Secure Boot: {0}")]
    SecureBoot(String),
    #[error("{name} has no pinned config in the admission list (config-sha256): refusing an enrolled machine that could run any config")]
    Unpinned { name: String },
    #[error("{name} must run config sha256:{expected}, it reports sha256:{found}")]
    WrongConfig {
        name: String,
        expected: String,
        found: String,
    },
    #[error("issuing the certificate failed: {0}")]
    Issue(String),
}

/// An issuer: the certificate and key this verifier signs leaves with.
pub struct Issuer {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// What the verifier decides with.
pub struct Verifier<'a> {
    pub admission: &'a Admission,
    /// The operator's PCR keys from the verifier's own /usr.
    pub keys: &'a [TrustedKey],
    pub issuer: &'a Issuer,
    /// Who this verifier is (recorded in the certificates it issues).
    pub name: &'a str,
    /// The operator's Secure Boot db certificate (DER) from the verifier's own /usr: a node's
    /// firmware must have booted with Secure Boot on and this as the only key in db (unless the
    /// admission list allows otherwise). `None` (an image without one) refuses every node that
    /// the list does not allow without Secure Boot.
    pub db_cert: Option<&'a [u8]>,
}

/// A session between the challenge and the evidence.
pub struct Pending {
    entry: Entry,
    ak: tpm2::AkPublic,
    csr: X509Req,
    csr_der: Vec<u8>,
    config_sha256: String,
    secret: [u8; 32],
    nonce: [u8; 32],
}

/// An admitted node's certificate.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub chain_pem: String,
    pub not_after: i64,
    pub name: String,
    pub pcr11: String,
}

fn random32() -> Result<[u8; 32], Refusal> {
    let mut b = [0u8; 32];
    openssl::rand::rand_bytes(&mut b).map_err(|e| Refusal::Issue(e.to_string()))?;
    Ok(b)
}

impl Verifier<'_> {
    /// Step 1: a Hello becomes a challenge only for an enrolled EK under its own name.
    pub fn challenge(&self, hello: &Hello) -> Result<(Pending, Challenge), Refusal> {
        if hello.version != crate::attest::protocol::VERSION {
            return Err(Refusal::Version(hello.version));
        }
        let serial = self.admission.serial;
        let entry = self
            .admission
            .entry(&hello.name)
            .ok_or_else(|| Refusal::UnknownName {
                name: hello.name.clone(),
                serial,
            })?
            .clone();
        let ek =
            tpm2::EkPublic::parse(&hello.ek_public).map_err(|e| Refusal::BadEk(e.to_string()))?;
        let ek_hash = ek.sha256().map_err(|e| Refusal::BadEk(e.to_string()))?;
        if ek_hash != entry.ek_sha256 {
            return Err(Refusal::UnknownEk {
                ek: ek_hash,
                name: entry.name.clone(),
                serial,
            });
        }
        let ak =
            tpm2::AkPublic::parse(&hello.ak_public).map_err(|e| Refusal::BadAk(e.to_string()))?;
        let csr = check_csr(&hello.csr)?;
        if !hello.config_sha256.is_empty() && !is_hex64(&hello.config_sha256) {
            return Err(Refusal::Malformed("config-sha256 is not a sha256".into()));
        }
        let secret = random32()?;
        let nonce = random32()?;
        let (credential_blob, encrypted_seed) = tpm2::make_credential(&ek, &ak.name(), &secret)
            .map_err(|e| Refusal::Issue(e.to_string()))?;
        Ok((
            Pending {
                entry,
                ak,
                csr,
                csr_der: hello.csr.clone(),
                config_sha256: hello.config_sha256.clone(),
                secret,
                nonce,
            },
            Challenge {
                credential_blob,
                encrypted_seed,
                nonce: nonce.to_vec(),
                pcrs: QUOTED_PCRS.to_vec(),
            },
        ))
    }

    /// Step 2: the evidence, checked against the session; a certificate valid from `now`.
    pub fn admit(&self, p: &Pending, e: &Evidence, now: i64) -> Result<Admitted, Refusal> {
        let values = e.values().map_err(|x| Refusal::Malformed(x.to_string()))?;
        let extra = qualifying_data(&p.nonce, &p.secret, &p.csr_der, &p.entry.name);
        let mut sorted = QUOTED_PCRS.to_vec();
        sorted.sort_unstable();
        tpm2::verify_quote(&p.ak, &e.attest, &e.signature, &extra, &sorted, &values)
            .map_err(Refusal::Quote)?;
        let pcr = |n: u32| -> [u8; 32] {
            sorted
                .iter()
                .position(|x| *x == n)
                .and_then(|i| values.get(i).copied())
                .unwrap_or([0xff; 32])
        };
        let Some(pinned) = &p.entry.config_sha256 else {
            return Err(Refusal::Unpinned {
                name: p.entry.name.clone(),
            });
        };
        if *pinned != p.config_sha256 {
            return Err(Refusal::WrongConfig {
                name: p.entry.name.clone(),
                expected: pinned.clone(),
                found: p.config_sha256.clone(),
            });
        }
        let firmware = eventlog::parse_tcg2(&e.firmware_log)
            .map_err(|x| Refusal::Malformed(format!("firmware event log: {x}")))?;
        let userspace = eventlog::parse_userspace(&e.userspace_log)
            .map_err(|x| Refusal::Malformed(format!("userspace event log: {x}")))?;
        let pcrsig = measure::parse_pcrsig(&e.pcrsig)
            .map_err(|x| Refusal::Malformed(format!(".pcrsig: {x}")))?;
        let state = boot_state::evaluate(&boot_state::Inputs {
            pcr11: pcr(11),
            pcr12: pcr(12),
            expected_pcr12: expected_pcr12(&p.config_sha256),
            pcr13: pcr(13),
            firmware: &firmware,
            userspace: &userspace,
            pcrsig: Some(&pcrsig),
            keys: self.keys,
        });
        if !state.trusted {
            return Err(Refusal::Untrusted(state.problems.join("; ")));
        }
        if !self.admission.allow_secure_boot_off {
            let db = self.db_cert.ok_or_else(|| {
                Refusal::SecureBoot(
                    "this verifier's image carries no db certificate to check against".into(),
                )
            })?;
            crate::trust::secureboot::check(&firmware, &pcr(7), db).map_err(Refusal::SecureBoot)?;
        }
        if self.admission.deny_pcr11.contains(&state.pcr11) {
            return Err(Refusal::Denied(state.pcr11));
        }
        let ttl = i64::try_from(self.admission.cert_ttl).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(ttl);
        let leaf = issue_leaf(self.issuer, &p.entry, &p.csr, now, not_after)
            .map_err(|x| Refusal::Issue(x.to_string()))?;
        let mut chain = leaf.to_pem().map_err(|x| Refusal::Issue(x.to_string()))?;
        chain.extend(
            self.issuer
                .cert
                .to_pem()
                .map_err(|x| Refusal::Issue(x.to_string()))?,
        );
        Ok(Admitted {
            chain_pem: String::from_utf8_lossy(&chain).into_owned(),
            not_after,
            name: p.entry.name.clone(),
            pcr11: state.pcr11,
        })
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// PCR 12 after the initrd measured the config with this hash (empty: no config).
pub fn expected_pcr12(config_sha256: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut pcr = [0u8; 32];
    let word = crate::node::provision::measurement(config_sha256);
    measure::extend(&mut pcr, &Sha256::digest(word.as_bytes()).into());
    pcr
}

fn check_csr(der: &[u8]) -> Result<X509Req, Refusal> {
    let bad = |m: &str| Refusal::BadCsr(m.to_string());
    if der.len() > 4096 {
        return Err(bad("larger than 4 KiB"));
    }
    let req = X509Req::from_der(der).map_err(|_| bad("not a DER PKCS#10 request"))?;
    let key = req.public_key().map_err(|_| bad("no public key"))?;
    if !req.verify(&key).unwrap_or(false) {
        return Err(bad("its signature does not verify with its own key"));
    }
    let ec = key.ec_key().map_err(|_| bad("not an EC key"))?;
    if ec.group().curve_name() != Some(openssl::nid::Nid::X9_62_PRIME256V1) {
        return Err(bad("not a P-256 key"));
    }
    Ok(req)
}

fn serial() -> Result<Asn1Integer, openssl::error::ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

/// The leaf: CN = the machine's name, SANs = its enrolled address, 127.0.0.1, `localhost` and
/// its name; serverAuth and clientAuth for members, clientAuth alone for clients; valid from
/// [`BACKDATE_SECS`] before `now` to `not_after`, and never past the issuer's own expiry. The
/// name and address come from the admission list, never from the request.
pub fn issue_leaf(
    issuer: &Issuer,
    entry: &Entry,
    csr: &X509Req,
    now: i64,
    not_after: i64,
) -> Result<X509, openssl::error::ErrorStack> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, &entry.name)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(issuer.cert.subject_name())?;
    b.set_pubkey(csr.public_key()?.as_ref())?;
    let not_before = Asn1Time::from_unix(now - BACKDATE_SECS)?;
    b.set_not_before(&not_before)?;
    let d = Asn1Time::from_unix(0)?.diff(issuer.cert.not_after())?;
    let issuer_end = i64::from(d.days) * 86400 + i64::from(d.secs);
    let end = Asn1Time::from_unix(not_after.min(issuer_end))?;
    b.set_not_after(&end)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    let mut eku = ExtendedKeyUsage::new();
    eku.client_auth();
    if entry.role == Role::Member {
        eku.server_auth();
    }
    b.append_extension(eku.build()?)?;
    let ctx = b.x509v3_context(Some(&issuer.cert), None);
    let san = SubjectAlternativeName::new()
        .ip(&entry.ip.to_string())
        .ip("127.0.0.1")
        .dns("localhost")
        .dns(&entry.name)
        .build(&ctx)?;
    let ski = SubjectKeyIdentifier::new().build(&ctx)?;
    let aki = AuthorityKeyIdentifier::new().keyid(true).build(&ctx)?;
    b.append_extension(san)?;
    b.append_extension(ski)?;
    b.append_extension(aki)?;
    b.sign(&issuer.key, MessageDigest::sha256())?;
    Ok(b.build())
}
