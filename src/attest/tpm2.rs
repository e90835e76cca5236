//! TPM 2.0 structures and the TPM-side cryptography a verifier does without a TPM: strict
//! parsers of the few marshalled structures attestation exchanges (an RSA endorsement key, an
//! ECC attestation key, a quote and its signature), object names, KDFa, the software halves of
//! TPM2_MakeCredential and of a duplication blob for TPM2_Import, and policy digests.
//!
//! Everything here is pure and works on bytes: it is what the verifier runs on evidence from the
//! network, so the parsers accept exactly one encoding (no trailing bytes, no other algorithm,
//! no other attributes) and every size is bounded before it is used. References: TPM 2.0
//! Library Part 1 (§11.4.10.2 KDFa, §23.3 duplication, §24 credential protection), Part 2
//! (structures), Part 3 (PolicyPCR, PolicyAuthorize, Quote).

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use openssl::symm::{encrypt, Cipher};
use sha2::{Digest, Sha256};

pub const TPM_ALG_RSA: u16 = 0x0001;
pub const TPM_ALG_KEYEDHASH: u16 = 0x0008;
pub const TPM_ALG_SHA256: u16 = 0x000B;
pub const TPM_ALG_AES: u16 = 0x0006;
pub const TPM_ALG_NULL: u16 = 0x0010;
pub const TPM_ALG_RSASSA: u16 = 0x0014;
pub const TPM_ALG_ECDSA: u16 = 0x0018;
pub const TPM_ALG_ECC: u16 = 0x0023;
pub const TPM_ALG_CFB: u16 = 0x0043;
pub const TPM_ECC_NIST_P256: u16 = 0x0003;
pub const TPM_GENERATED_VALUE: u32 = 0xFF54_4347;
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
pub const TPM_CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
pub const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;

/// TPMA_OBJECT bits.
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

/// The attributes of the TCG default RSA 2048 endorsement key (EK Credential Profile, template
/// L-1): fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy, restricted, decrypt.
pub const EK_ATTRIBUTES: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::ADMIN_WITH_POLICY
    | attr::RESTRICTED
    | attr::DECRYPT;

/// The default EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile, policy A).
pub const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// The attributes an attestation key must have: a restricted signing key the TPM made and keeps.
pub const AK_ATTRIBUTES: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH
    | attr::RESTRICTED
    | attr::SIGN;

/// Largest structure accepted anywhere here (a TPMT_PUBLIC or TPMS_ATTEST is far smaller).
pub const MAX_STRUCTURE: usize = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Tpm2Error {
    #[error("{what}: the structure ends early (at byte {at})")]
    Short { what: &'static str, at: usize },
    #[error("{what}: {extra} bytes after the end of the structure")]
    Trailing { what: &'static str, extra: usize },
    #[error("{what}: {field} is {found:#x}, expected {expected:#x}")]
    Field {
        what: &'static str,
        field: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("{0}")]
    Crypto(String),
}

impl From<openssl::error::ErrorStack> for Tpm2Error {
    fn from(e: openssl::error::ErrorStack) -> Self {
        Tpm2Error::Crypto(e.to_string())
    }
}

fn invalid(what: &'static str, reason: impl Into<String>) -> Tpm2Error {
    Tpm2Error::Invalid {
        what,
        reason: reason.into(),
    }
}

/// A big-endian reader over a marshalled structure.
pub struct Reader<'a> {
    what: &'static str,
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(what: &'static str, data: &'a [u8]) -> Result<Self, Tpm2Error> {
        if data.len() > MAX_STRUCTURE {
            return Err(invalid(what, format!("{} bytes is too large", data.len())));
        }
        Ok(Reader { what, data, at: 0 })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Tpm2Error> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len());
        let Some(end) = end else {
            return Err(Tpm2Error::Short {
                what: self.what,
                at: self.at,
            });
        };
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, Tpm2Error> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Tpm2Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Tpm2Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Tpm2Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: a u16 size and that many bytes.
    pub fn sized(&mut self) -> Result<&'a [u8], Tpm2Error> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// Reads a u16 that must equal `expected`.
    pub fn expect16(&mut self, field: &'static str, expected: u16) -> Result<(), Tpm2Error> {
        let found = self.u16()?;
        if found != expected {
            return Err(Tpm2Error::Field {
                what: self.what,
                field,
                found: found.into(),
                expected: expected.into(),
            });
        }
        Ok(())
    }

    pub fn end(&self) -> Result<(), Tpm2Error> {
        match self.data.len() - self.at {
            0 => Ok(()),
            extra => Err(Tpm2Error::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

/// A big-endian writer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A TPM2B. Callers pass what fits a u16 (keys, digests, small secrets).
    pub fn sized(&mut self, v: &[u8]) -> &mut Self {
        let n = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.u16(n);
        self.0.extend_from_slice(&v[..usize::from(n)]);
        self
    }
}

/// An object's name: its nameAlg (sha256) and the digest of its marshalled TPMT_PUBLIC.
pub fn name(public: &[u8]) -> Vec<u8> {
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&Sha256::digest(public));
    n
}

fn attributes(r: &mut Reader, expected: u32) -> Result<(), Tpm2Error> {
    let found = r.u32()?;
    if found != expected {
        return Err(Tpm2Error::Field {
            what: r.what,
            field: "objectAttributes",
            found: found.into(),
            expected: expected.into(),
        });
    }
    Ok(())
}

/// An endorsement key of the TCG default RSA 2048 template, parsed from its TPMT_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkPublic {
    pub modulus: Vec<u8>,
    /// The marshalled TPMT_PUBLIC it was read from.
    pub marshalled: Vec<u8>,
}

impl EkPublic {
    /// Accepts only the default template: MakeCredential's seed size, symmetric key and name
    /// algorithm depend on it, and anything else is not an EK the operator enrolled.
    pub fn parse(data: &[u8]) -> Result<Self, Tpm2Error> {
        let mut r = Reader::new("endorsement key", data)?;
        r.expect16("type", TPM_ALG_RSA)?;
        r.expect16("nameAlg", TPM_ALG_SHA256)?;
        attributes(&mut r, EK_ATTRIBUTES)?;
        if r.sized()? != EK_POLICY {
            return Err(invalid(
                "endorsement key",
                "authPolicy is not the default EK policy",
            ));
        }
        r.expect16("symmetric algorithm", TPM_ALG_AES)?;
        r.expect16("symmetric key bits", 128)?;
        r.expect16("symmetric mode", TPM_ALG_CFB)?;
        r.expect16("scheme", TPM_ALG_NULL)?;
        r.expect16("keyBits", 2048)?;
        let exponent = r.u32()?;
        if exponent != 0 && exponent != 65537 {
            return Err(invalid("endorsement key", "exponent is not 65537"));
        }
        let modulus = r.sized()?.to_vec();
        r.end()?;
        if modulus.len() != 256 {
            return Err(invalid(
                "endorsement key",
                format!("modulus has {} bytes, not 256", modulus.len()),
            ));
        }
        Ok(EkPublic {
            modulus,
            marshalled: data.to_vec(),
        })
    }

    /// An EK from the PEM public key `keel-agent ek` prints (RSA 2048, exponent 65537): enough
    /// to enrol it and to seal or protect secrets for it.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Tpm2Error> {
        let key = PKey::public_key_from_pem(pem)
            .map_err(|e| invalid("endorsement key", format!("not a PEM public key: {e}")))?;
        let rsa = key
            .rsa()
            .map_err(|_| invalid("endorsement key", "not an RSA key"))?;
        if rsa.size() != 256 || rsa.e().to_vec() != [1, 0, 1] {
            return Err(invalid(
                "endorsement key",
                "not an RSA 2048 key with exponent 65537 (the TCG default EK)",
            ));
        }
        Ok(EkPublic {
            modulus: rsa.n().to_vec_padded(256)?,
            marshalled: Vec::new(),
        })
    }

    pub fn key(&self) -> Result<PKey<Public>, Tpm2Error> {
        let n = BigNum::from_slice(&self.modulus)?;
        let e = BigNum::from_u32(65537)?;
        Ok(PKey::from_rsa(Rsa::from_public_components(n, e)?)?)
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo: how the enrolled-machines list names it.
    pub fn sha256(&self) -> Result<String, Tpm2Error> {
        spki_sha256(&self.key()?)
    }

    /// The EK as PEM (SubjectPublicKeyInfo), what `keel-agent ek` prints for enrolment.
    pub fn pem(&self) -> Result<String, Tpm2Error> {
        let pem = self.key()?.public_key_to_pem()?;
        String::from_utf8(pem).map_err(|e| Tpm2Error::Crypto(e.to_string()))
    }
}

/// `sha256:<hex>` of a public key's DER SubjectPublicKeyInfo.
pub fn spki_sha256(key: &PKey<Public>) -> Result<String, Tpm2Error> {
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(key.public_key_to_der()?))
    ))
}

/// A restricted ECDSA P-256 signing key (the attestation key), from its TPMT_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkPublic {
    pub x: Vec<u8>,
    pub y: Vec<u8>,
    pub marshalled: Vec<u8>,
}

impl AkPublic {
    pub fn parse(data: &[u8]) -> Result<Self, Tpm2Error> {
        let mut r = Reader::new("attestation key", data)?;
        r.expect16("type", TPM_ALG_ECC)?;
        r.expect16("nameAlg", TPM_ALG_SHA256)?;
        attributes(&mut r, AK_ATTRIBUTES)?;
        let policy = r.sized()?;
        if !policy.is_empty() {
            return Err(invalid("attestation key", "has an authPolicy"));
        }
        r.expect16("symmetric", TPM_ALG_NULL)?;
        r.expect16("scheme", TPM_ALG_ECDSA)?;
        r.expect16("scheme hash", TPM_ALG_SHA256)?;
        r.expect16("curve", TPM_ECC_NIST_P256)?;
        r.expect16("kdf", TPM_ALG_NULL)?;
        let x = r.sized()?.to_vec();
        let y = r.sized()?.to_vec();
        r.end()?;
        if x.len() != 32 || y.len() != 32 {
            return Err(invalid("attestation key", "the point is not a P-256 point"));
        }
        let ak = AkPublic {
            x,
            y,
            marshalled: data.to_vec(),
        };
        ak.key()?;
        Ok(ak)
    }

    pub fn name(&self) -> Vec<u8> {
        name(&self.marshalled)
    }

    pub fn key(&self) -> Result<EcKey<Public>, Tpm2Error> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let x = BigNum::from_slice(&self.x)?;
        let y = BigNum::from_slice(&self.y)?;
        EcKey::from_public_key_affine_coordinates(&group, &x, &y)
            .map_err(|_| invalid("attestation key", "the point is not on P-256"))
    }
}

/// A TPMS_ATTEST of type quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub extra_data: Vec<u8>,
    /// (hash algorithm, selection bitmap) per bank.
    pub selection: Vec<(u16, Vec<u8>)>,
    pub pcr_digest: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
}

impl Quote {
    pub fn parse(data: &[u8]) -> Result<Self, Tpm2Error> {
        let mut r = Reader::new("quote", data)?;
        let magic = r.u32()?;
        if magic != TPM_GENERATED_VALUE {
            return Err(Tpm2Error::Field {
                what: "quote",
                field: "magic",
                found: magic.into(),
                expected: TPM_GENERATED_VALUE.into(),
            });
        }
        r.expect16("type", TPM_ST_ATTEST_QUOTE)?;
        let _signer = r.sized()?;
        let extra_data = r.sized()?.to_vec();
        let clock = r.u64()?;
        let reset_count = r.u32()?;
        let restart_count = r.u32()?;
        let _safe = r.u8()?;
        let firmware_version = r.u64()?;
        let count = r.u32()?;
        if count > 16 {
            return Err(invalid("quote", format!("{count} PCR banks")));
        }
        let mut selection = Vec::new();
        for _ in 0..count {
            let alg = r.u16()?;
            let n = r.u8()?;
            selection.push((alg, r.take(usize::from(n))?.to_vec()));
        }
        let pcr_digest = r.sized()?.to_vec();
        r.end()?;
        Ok(Quote {
            extra_data,
            selection,
            pcr_digest,
            clock,
            reset_count,
            restart_count,
            firmware_version,
        })
    }
}

/// The selection bitmap (3 bytes: PCRs 0-23) of a list of PCR indices.
pub fn selection_bitmap(pcrs: &[u32]) -> Vec<u8> {
    let mut map = vec![0u8; 3];
    for p in pcrs.iter().filter(|p| **p < 24) {
        map[(*p / 8) as usize] |= 1 << (p % 8);
    }
    map
}

/// A TPMT_SIGNATURE holding an ECDSA-SHA256 signature, as DER for openssl.
pub fn parse_ecdsa_signature(data: &[u8]) -> Result<EcdsaSig, Tpm2Error> {
    let mut r = Reader::new("quote signature", data)?;
    r.expect16("signature algorithm", TPM_ALG_ECDSA)?;
    r.expect16("signature hash", TPM_ALG_SHA256)?;
    let rr = r.sized()?;
    let s = r.sized()?;
    r.end()?;
    if rr.is_empty() || s.is_empty() || rr.len() > 32 || s.len() > 32 {
        return Err(invalid("quote signature", "r or s has the wrong size"));
    }
    Ok(EcdsaSig::from_private_components(
        BigNum::from_slice(rr)?,
        BigNum::from_slice(s)?,
    )?)
}

/// Why a quote is refused, each in its own words.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    #[error("the quote is malformed: {0}")]
    Malformed(Tpm2Error),
    #[error("the quote's signature is not the attestation key's")]
    BadSignature,
    #[error("the quote is not bound to this session (its qualifying data differs)")]
    WrongExtraData,
    #[error("the quote covers other PCRs than the ones asked for")]
    WrongSelection,
    #[error("the PCR values sent do not match the quote's digest")]
    WrongDigest,
}

/// Checks a quote: signature by `ak` over the exact bytes, magic and type (in [`Quote::parse`]),
/// qualifying data, selection (the sha256 bank, exactly `pcrs`) and that `values` (in ascending
/// PCR order) hash to the quoted digest. Returns the parsed quote.
pub fn verify_quote(
    ak: &AkPublic,
    attest: &[u8],
    signature: &[u8],
    expected_extra: &[u8],
    pcrs: &[u32],
    values: &[[u8; 32]],
) -> Result<Quote, QuoteError> {
    let sig = parse_ecdsa_signature(signature).map_err(QuoteError::Malformed)?;
    let key = ak.key().map_err(QuoteError::Malformed)?;
    let digest = Sha256::digest(attest);
    if !sig.verify(&digest, &key).unwrap_or(false) {
        return Err(QuoteError::BadSignature);
    }
    let quote = Quote::parse(attest).map_err(QuoteError::Malformed)?;
    if quote.extra_data != expected_extra {
        return Err(QuoteError::WrongExtraData);
    }
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if quote.selection != [(TPM_ALG_SHA256, selection_bitmap(&sorted))]
        || values.len() != sorted.len()
    {
        return Err(QuoteError::WrongSelection);
    }
    let mut h = Sha256::new();
    for v in values {
        h.update(v);
    }
    if h.finalize().as_slice() != quote.pcr_digest {
        return Err(QuoteError::WrongDigest);
    }
    Ok(quote)
}

/// KDFa with SHA-256 (Part 1 §11.4.10.2): `bits` of HMAC(key, i ‖ label ‖ 0 ‖ u ‖ v ‖ bits).
pub fn kdfa(key: &[u8], label: &str, u: &[u8], v: &[u8], bits: u32) -> Result<Vec<u8>, Tpm2Error> {
    let bytes = (bits as usize).div_ceil(8);
    let hmac_key = PKey::hmac(key)?;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut s = Signer::new(MessageDigest::sha256(), &hmac_key)?;
        s.update(&counter.to_be_bytes())?;
        s.update(label.as_bytes())?;
        s.update(&[0])?;
        s.update(u)?;
        s.update(v)?;
        s.update(&bits.to_be_bytes())?;
        out.extend_from_slice(&s.sign_to_vec()?);
        counter += 1;
    }
    out.truncate(bytes);
    Ok(out)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, Tpm2Error> {
    let k = PKey::hmac(key)?;
    let mut s = Signer::new(MessageDigest::sha256(), &k)?;
    for p in parts {
        s.update(p)?;
    }
    Ok(s.sign_to_vec()?)
}

/// MGF1 with SHA-256 (RFC 8017 B.2.1).
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(counter.to_be_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// RSA-OAEP (SHA-256, MGF1-SHA-256) of `seed` to `ek` with a TPM label such as "IDENTITY"
/// (RFC 8017 7.1.1; the label includes its terminating zero, Part 1 B.10.3). The padding is
/// done here and the RSA operation by openssl: OpenSSL 3.0's
/// `EVP_PKEY_CTX_set0_rsa_oaep_label` leaks the label it is given (found by the attest fuzz
/// target under LeakSanitizer), and a verifier runs for months. The TPMs in
/// tests/attest_tpm.rs decrypt what this makes.
fn encrypt_seed(ek: &EkPublic, seed: &[u8], label: &str) -> Result<Vec<u8>, Tpm2Error> {
    let k = ek.modulus.len();
    if seed.len() > k - 2 * 32 - 2 {
        return Err(invalid("seed", "too long for OAEP"));
    }
    let mut l = label.as_bytes().to_vec();
    l.push(0);
    let mut db = Sha256::digest(&l).to_vec();
    db.resize(k - seed.len() - 32 - 2, 0);
    db.push(1);
    db.extend_from_slice(seed);
    let mut rnd = [0u8; 32];
    openssl::rand::rand_bytes(&mut rnd)?;
    for (d, m) in db.iter_mut().zip(mgf1(&rnd, k - 32 - 1)) {
        *d ^= m;
    }
    for (r, m) in rnd.iter_mut().zip(mgf1(&db, 32)) {
        *r ^= m;
    }
    let mut em = vec![0u8];
    em.extend_from_slice(&rnd);
    em.extend_from_slice(&db);
    let rsa = ek.key()?.rsa()?;
    let mut out = vec![0u8; rsa.size() as usize];
    let n = rsa.public_encrypt(&em, &mut out, Padding::NONE)?;
    out.truncate(n);
    Ok(out)
}

/// The outer wrapper shared by credentials and duplication blobs: `plain` encrypted with
/// AES-128-CFB under KDFa(seed, "STORAGE", name) and an HMAC under KDFa(seed, "INTEGRITY").
/// Returns the TPM2B_DIGEST of the HMAC followed by the ciphertext.
fn outer_wrap(seed: &[u8], object_name: &[u8], plain: &[u8]) -> Result<Vec<u8>, Tpm2Error> {
    let sym = kdfa(seed, "STORAGE", object_name, &[], 128)?;
    let enc = encrypt(Cipher::aes_128_cfb128(), &sym, Some(&[0u8; 16]), plain)?;
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256)?;
    let mac = hmac_sha256(&hmac_key, &[&enc, object_name])?;
    let mut w = Writer::default();
    w.sized(&mac).bytes(&enc);
    Ok(w.0)
}

/// TPM2_MakeCredential in software: `secret` (≤ 32 bytes) protected so that only the TPM holding
/// `ek` can release it, and only to the key named `ak_name` (Part 1 §24). Returns the
/// TPM2B_ID_OBJECT payload and the encrypted seed (TPM2B_ENCRYPTED_SECRET payload).
pub fn make_credential(
    ek: &EkPublic,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), Tpm2Error> {
    if secret.len() > 32 {
        return Err(invalid("credential", "a secret is at most 32 bytes"));
    }
    let mut seed = [0u8; 32];
    openssl::rand::rand_bytes(&mut seed)?;
    let encrypted_seed = encrypt_seed(ek, &seed, "IDENTITY")?;
    let mut cv = Writer::default();
    cv.sized(secret);
    let blob = outer_wrap(&seed, ak_name, &cv.0)?;
    Ok((blob, encrypted_seed))
}

/// A sealed data object made outside the TPM and wrapped for TPM2_Import under an EK.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportBlob {
    /// TPMT_PUBLIC of the sealed object (KEYEDHASH, policy-only).
    #[serde(with = "hex::serde")]
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE payload: outer HMAC and the encrypted TPM2B_SENSITIVE.
    #[serde(with = "hex::serde")]
    pub duplicate: Vec<u8>,
    /// The seed, RSA-OAEP encrypted to the EK with label "DUPLICATE".
    #[serde(with = "hex::serde")]
    pub encrypted_seed: Vec<u8>,
}

/// The TPMT_PUBLIC of a sealed data object whose only way to use it is `policy`.
pub fn sealed_object_public(policy: &[u8; 32], unique: &[u8; 32]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u16(TPM_ALG_KEYEDHASH)
        .u16(TPM_ALG_SHA256)
        .u32(attr::ADMIN_WITH_POLICY | attr::NO_DA)
        .sized(policy)
        .u16(TPM_ALG_NULL)
        .sized(unique);
    w.0
}

/// Seals `data` (≤ 128 bytes) to the TPM holding `ek`, usable only through `policy`
/// (Part 1 §23.3: an outer wrapper and no inner one).
pub fn seal_for_import(
    ek: &EkPublic,
    policy: &[u8; 32],
    data: &[u8],
) -> Result<ImportBlob, Tpm2Error> {
    if data.len() > 128 {
        return Err(invalid("sealed object", "at most 128 bytes can be sealed"));
    }
    let mut obfuscate = [0u8; 32];
    openssl::rand::rand_bytes(&mut obfuscate)?;
    let mut h = Sha256::new();
    h.update(obfuscate);
    h.update(data);
    let unique: [u8; 32] = h.finalize().into();
    let public = sealed_object_public(policy, &unique);
    // TPMT_SENSITIVE { KEYEDHASH, authValue (empty), seedValue, sensitive data }, as a TPM2B.
    let mut sensitive = Writer::default();
    sensitive
        .u16(TPM_ALG_KEYEDHASH)
        .sized(&[])
        .sized(&obfuscate)
        .sized(data);
    let mut plain = Writer::default();
    plain.sized(&sensitive.0);
    let mut seed = [0u8; 32];
    openssl::rand::rand_bytes(&mut seed)?;
    let encrypted_seed = encrypt_seed(ek, &seed, "DUPLICATE")?;
    let duplicate = outer_wrap(&seed, &name(&public), &plain.0)?;
    Ok(ImportBlob {
        public,
        duplicate,
        encrypted_seed,
    })
}

/// The TPMT_PUBLIC under which the TPM loads an operator's RSA public key to check its policy
/// signatures (RSASSA-SHA256, sign only). Node and host build it with this one function, so
/// the key's name (which a PolicyAuthorize digest commits to) is the same on both.
pub fn rsa_verify_key_public(key: &PKey<Public>) -> Result<Vec<u8>, Tpm2Error> {
    let rsa = key.rsa()?;
    let bits =
        u16::try_from(rsa.size() * 8).map_err(|_| invalid("policy key", "RSA key too large"))?;
    let e = rsa.e().to_vec();
    let exponent = match e.as_slice() {
        [0x01, 0x00, 0x01] => 0,
        other => {
            let mut v = 0u32;
            for b in other {
                v = v.checked_shl(8).unwrap_or(0) | u32::from(*b);
            }
            v
        }
    };
    let mut w = Writer::default();
    w.u16(TPM_ALG_RSA)
        .u16(TPM_ALG_SHA256)
        .u32(attr::USER_WITH_AUTH | attr::SIGN)
        .sized(&[])
        .u16(TPM_ALG_NULL)
        .u16(TPM_ALG_RSASSA)
        .u16(TPM_ALG_SHA256)
        .u16(bits)
        .u32(exponent)
        .sized(&rsa.n().to_vec());
    Ok(w.0)
}

/// policyDigest after TPM2_PolicyAuthorize(keySign = `key_name`, policyRef empty) (Part 3 §23.16).
pub fn policy_authorize(key_name: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_AUTHORIZE.to_be_bytes());
    h.update(key_name);
    let first: [u8; 32] = h.finalize().into();
    Sha256::digest(first).into()
}

/// policyDigest after TPM2_PolicyPCR over the sha256 PCRs `pcrs` (ascending) holding `values`,
/// starting from `start`.
pub fn policy_pcr(start: &[u8; 32], pcrs: &[u32], values: &[[u8; 32]]) -> [u8; 32] {
    let mut pcr_digest = Sha256::new();
    for v in values {
        pcr_digest.update(v);
    }
    let mut h = Sha256::new();
    h.update(start);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    h.update(1u32.to_be_bytes());
    h.update(TPM_ALG_SHA256.to_be_bytes());
    h.update([3u8]);
    h.update(selection_bitmap(pcrs));
    h.update(pcr_digest.finalize());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_follows_its_definition() {
        // Computed by hand from the definition for one block; a second block must continue
        // with counter 2 and the first 16 bytes must be the first block's.
        let k = kdfa(b"key", "STORAGE", b"u", b"v", 256).expect("kdfa");
        let one = hmac_sha256(
            b"key",
            &[&1u32.to_be_bytes(), b"STORAGE\0uv", &256u32.to_be_bytes()],
        )
        .expect("hmac");
        assert_eq!(k, one);
        let short = kdfa(b"key", "STORAGE", b"u", b"v", 128).expect("kdfa");
        assert_ne!(short[..], k[..16], "the bit count is part of the input");
        let long = kdfa(b"key", "X", &[], &[], 512).expect("kdfa");
        assert_eq!(long.len(), 64);
    }

    /// The hand-made OAEP padding decrypts with openssl's own OAEP (same label), so it is the
    /// standard encoding and not merely one the swtpm tests happen to accept.
    #[test]
    fn oaep_padding_is_what_openssl_decrypts() {
        let rsa = Rsa::generate(2048).expect("rsa");
        let ek = EkPublic {
            modulus: rsa.n().to_vec(),
            marshalled: vec![],
        };
        let ct = encrypt_seed(&ek, b"0123456789abcdef0123456789abcdef", "IDENTITY").expect("enc");
        let key = PKey::from_rsa(rsa).expect("pkey");
        let mut d = openssl::encrypt::Decrypter::new(&key).expect("dec");
        d.set_rsa_padding(Padding::PKCS1_OAEP).expect("pad");
        d.set_rsa_oaep_md(MessageDigest::sha256()).expect("md");
        d.set_rsa_mgf1_md(MessageDigest::sha256()).expect("mgf");
        d.set_rsa_oaep_label(b"IDENTITY\0").expect("label");
        let mut out = vec![0u8; d.decrypt_len(&ct).expect("len")];
        let n = d.decrypt(&ct, &mut out).expect("decrypts");
        assert_eq!(&out[..n], b"0123456789abcdef0123456789abcdef");
        d.set_rsa_oaep_label(b"DUPLICATE\0").expect("label");
        assert!(d.decrypt(&ct, &mut out).is_err(), "the label is bound");
    }

    #[test]
    fn policy_pcr_of_pcr11_alone_is_the_measure_modules() {
        let v = [7u8; 32];
        assert_eq!(
            policy_pcr(&[0u8; 32], &[11], &[v]),
            crate::trust::measure::policy_pcr_digest(&v)
        );
    }

    #[test]
    fn the_reader_refuses_short_and_trailing_data() {
        let mut r = Reader::new("t", &[0, 5, 1]).expect("reader");
        assert!(matches!(r.sized(), Err(Tpm2Error::Short { .. })));
        let mut r = Reader::new("t", &[0, 1, 1, 9]).expect("reader");
        assert_eq!(r.sized().expect("sized"), &[1]);
        assert!(matches!(r.end(), Err(Tpm2Error::Trailing { extra: 1, .. })));
        assert!(Reader::new("t", &vec![0; MAX_STRUCTURE + 1]).is_err());
    }

    fn ak_bytes(attrs: u32) -> (Vec<u8>, EcKey<openssl::pkey::Private>) {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("group");
        let key = EcKey::generate(&group).expect("key");
        let mut ctx = openssl::bn::BigNumContext::new().expect("ctx");
        let (mut x, mut y) = (BigNum::new().expect("x"), BigNum::new().expect("y"));
        key.public_key()
            .affine_coordinates(&group, &mut x, &mut y, &mut ctx)
            .expect("coords");
        let mut w = Writer::default();
        w.u16(TPM_ALG_ECC)
            .u16(TPM_ALG_SHA256)
            .u32(attrs)
            .sized(&[])
            .u16(TPM_ALG_NULL)
            .u16(TPM_ALG_ECDSA)
            .u16(TPM_ALG_SHA256)
            .u16(TPM_ECC_NIST_P256)
            .u16(TPM_ALG_NULL)
            .sized(&x.to_vec_padded(32).expect("x"))
            .sized(&y.to_vec_padded(32).expect("y"));
        (w.0, key)
    }

    #[test]
    fn an_attestation_key_must_be_restricted_and_tpm_made() {
        let (good, _) = ak_bytes(AK_ATTRIBUTES);
        AkPublic::parse(&good).expect("a restricted AK parses");
        for drop in [
            attr::RESTRICTED,
            attr::FIXED_TPM,
            attr::SENSITIVE_DATA_ORIGIN,
        ] {
            let (bad, _) = ak_bytes(AK_ATTRIBUTES & !drop);
            assert!(
                matches!(
                    AkPublic::parse(&bad),
                    Err(Tpm2Error::Field {
                        field: "objectAttributes",
                        ..
                    })
                ),
                "attribute {drop:#x} missing must be refused"
            );
        }
        let (decrypting, _) = ak_bytes(AK_ATTRIBUTES | attr::DECRYPT);
        assert!(AkPublic::parse(&decrypting).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(AkPublic::parse(&trailing).is_err());
    }

    /// A quote signed by a software key standing in for the AK: every field changed alone is
    /// refused with its own reason (the tamper matrix; the TPM-made case is in
    /// tests/attest_tpm.rs).
    #[test]
    fn quote_tamper_matrix() {
        let (ak_bytes, key) = ak_bytes(AK_ATTRIBUTES);
        let ak = AkPublic::parse(&ak_bytes).expect("ak");
        let pcrs = [0u32, 11, 12];
        let values = [[1u8; 32], [2u8; 32], [3u8; 32]];
        let make = |magic: u32, ty: u16, extra: &[u8], sel: &[u8], vals: &[[u8; 32]]| {
            let mut d = Sha256::new();
            for v in vals {
                d.update(v);
            }
            let mut w = Writer::default();
            w.u32(magic)
                .u16(ty)
                .sized(&[0, 0x0b, 1])
                .sized(extra)
                .bytes(&[0; 17])
                .bytes(&[0; 8])
                .u32(1)
                .u16(TPM_ALG_SHA256)
                .bytes(&[3])
                .bytes(sel)
                .sized(&d.finalize());
            w.0
        };
        let sign = |attest: &[u8]| {
            let sig = EcdsaSig::sign(&Sha256::digest(attest), &key).expect("sign");
            let mut w = Writer::default();
            w.u16(TPM_ALG_ECDSA)
                .u16(TPM_ALG_SHA256)
                .sized(&sig.r().to_vec())
                .sized(&sig.s().to_vec());
            w.0
        };
        let sel = selection_bitmap(&pcrs);
        let good = make(
            TPM_GENERATED_VALUE,
            TPM_ST_ATTEST_QUOTE,
            b"nonce",
            &sel,
            &values,
        );
        verify_quote(&ak, &good, &sign(&good), b"nonce", &pcrs, &values).expect("good quote");

        let check = |attest: Vec<u8>, want: fn(&QuoteError) -> bool| {
            let e = verify_quote(&ak, &attest, &sign(&attest), b"nonce", &pcrs, &values)
                .expect_err("tampered quote accepted");
            assert!(want(&e), "{e}");
        };
        check(
            make(0xFF54_4348, TPM_ST_ATTEST_QUOTE, b"nonce", &sel, &values),
            |e| matches!(e, QuoteError::Malformed(_)),
        );
        check(
            make(TPM_GENERATED_VALUE, 0x8017, b"nonce", &sel, &values),
            |e| matches!(e, QuoteError::Malformed(_)),
        );
        check(
            make(
                TPM_GENERATED_VALUE,
                TPM_ST_ATTEST_QUOTE,
                b"other",
                &sel,
                &values,
            ),
            |e| *e == QuoteError::WrongExtraData,
        );
        check(
            make(
                TPM_GENERATED_VALUE,
                TPM_ST_ATTEST_QUOTE,
                b"nonce",
                &selection_bitmap(&[0, 11]),
                &values,
            ),
            |e| *e == QuoteError::WrongSelection,
        );
        check(
            make(
                TPM_GENERATED_VALUE,
                TPM_ST_ATTEST_QUOTE,
                b"nonce",
                &sel,
                &[[1u8; 32], [9u8; 32], [3u8; 32]],
            ),
            |e| *e == QuoteError::WrongDigest,
        );
        // A signature by another key, and a changed byte after signing.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            verify_quote(&ak, &flipped, &sign(&good), b"nonce", &pcrs, &values),
            Err(QuoteError::BadSignature)
        );
        let (_, other) = super::tests::ak_bytes(AK_ATTRIBUTES);
        let sig = EcdsaSig::sign(&Sha256::digest(&good), &other).expect("sign");
        let mut w = Writer::default();
        w.u16(TPM_ALG_ECDSA)
            .u16(TPM_ALG_SHA256)
            .sized(&sig.r().to_vec())
            .sized(&sig.s().to_vec());
        assert_eq!(
            verify_quote(&ak, &good, &w.0, b"nonce", &pcrs, &values),
            Err(QuoteError::BadSignature)
        );
    }

    #[test]
    fn rsa_verify_key_public_round_trips_as_a_tpm_structure() {
        use tss_esapi::traits::{Marshall, UnMarshall};
        let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey");
        let public =
            PKey::public_key_from_pem(&key.public_key_to_pem().expect("pem")).expect("public");
        let bytes = rsa_verify_key_public(&public).expect("public area");
        let parsed = tss_esapi::structures::Public::unmarshall(&bytes).expect("tss parses it");
        assert_eq!(parsed.marshall().expect("marshall"), bytes);
        let blob = seal_for_import(
            &EkPublic {
                modulus: public.rsa().expect("rsa").n().to_vec(),
                marshalled: vec![],
            },
            &[1u8; 32],
            b"secret",
        )
        .expect("seal");
        let parsed = tss_esapi::structures::Public::unmarshall(&blob.public).expect("sealed");
        assert_eq!(parsed.marshall().expect("marshall"), blob.public);
    }
}
