//! cosign's "simple signing" signatures, verified and made without cosign.
//!
//! A signature is ECDSA P-256 with SHA-256 over the exact bytes of a JSON payload that names the
//! image manifest's digest (`critical.image.docker-manifest-digest`), encoded as base64 of the DER
//! signature — what `cosign sign-blob --key` prints for that payload and `cosign verify-blob`
//! checks. The signature is checked before the payload is parsed, and the payload is only
//! trusted for the manifest digest it names: the caller compares that with the manifest it has.

use base64::Engine;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::sign::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `critical.type` of cosign's simple signing payloads.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest signature accepted (a DER ECDSA P-256 signature is at most 72 bytes).
const MAX_SIGNATURE: usize = 256;
/// Largest payload accepted.
const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the signature is not base64 ({0})")]
    NotBase64(String),
    #[error("the signature is empty or longer than {MAX_SIGNATURE} bytes")]
    BadLength,
    #[error("the payload is larger than {MAX_PAYLOAD} bytes")]
    PayloadTooLarge,
    #[error("no trusted key verifies the signature (tried {0} key(s)): signed by another key, or the payload or signature changed")]
    NoKeyMatches(usize),
    #[error("the signed payload is not a cosign simple signing payload: {0}")]
    Payload(String),
    #[error("the signed payload has type `{0}`, not `{PAYLOAD_TYPE}`")]
    UnknownType(String),
    #[error("the signed manifest digest `{0}` is not sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("the image's manifest has digest {actual}, but the signature is for {signed}")]
    DigestMismatch { signed: String, actual: String },
    #[error("key: {0}")]
    Key(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    #[serde(default)]
    optional: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    type_: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// A public key allowed to sign containers, with a name for messages.
pub struct TrustedKey {
    pub name: String,
    pub key: PKey<Public>,
}

impl TrustedKey {
    /// Parses a PEM public key (cosign.pub, or keel's container-signing key); only ECDSA P-256.
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<TrustedKey, SignatureError> {
        let key = PKey::public_key_from_pem(pem)
            .map_err(|e| SignatureError::Key(format!("{name}: {e}")))?;
        let ec = key
            .ec_key()
            .map_err(|_| SignatureError::Key(format!("{name}: not an ECDSA key")))?;
        if ec.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            return Err(SignatureError::Key(format!("{name}: not a P-256 key")));
        }
        Ok(TrustedKey {
            name: name.to_string(),
            key,
        })
    }
}

/// What a verified signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sha256:<hex>` of the image manifest.
    pub manifest_digest: String,
    /// The reference the signer named (informational: cosign ignores it too).
    pub reference: String,
    /// The trusted key that verified it.
    pub key: String,
}

/// Verifies `signature` (base64 DER, as cosign prints it) over `payload` with the trusted keys,
/// then parses the payload.
pub fn verify(
    payload: &[u8],
    signature: &str,
    keys: &[TrustedKey],
) -> Result<Verified, SignatureError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(SignatureError::PayloadTooLarge);
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|e| SignatureError::NotBase64(e.to_string()))?;
    if sig.is_empty() || sig.len() > MAX_SIGNATURE {
        return Err(SignatureError::BadLength);
    }
    let key = signed_by(payload, &sig, keys).ok_or(SignatureError::NoKeyMatches(keys.len()))?;
    let (digest, reference) = parse_payload(payload)?;
    Ok(Verified {
        manifest_digest: digest,
        reference,
        key: key.name.clone(),
    })
}

/// The first trusted key whose ECDSA/SHA-256 signature `sig` (DER) over `bytes` verifies.
pub fn signed_by<'a>(bytes: &[u8], sig: &[u8], keys: &'a [TrustedKey]) -> Option<&'a TrustedKey> {
    keys.iter().find(|k| {
        Verifier::new(MessageDigest::sha256(), &k.key)
            .and_then(|mut v| v.verify_oneshot(sig, bytes))
            .unwrap_or(false)
    })
}

/// Parses a simple-signing payload (after its signature held): the manifest digest it names
/// and the reference. Public for the fuzz target.
pub fn parse_payload(payload: &[u8]) -> Result<(String, String), SignatureError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(SignatureError::PayloadTooLarge);
    }
    let p: Payload =
        serde_json::from_slice(payload).map_err(|e| SignatureError::Payload(e.to_string()))?;
    if p.critical.type_ != PAYLOAD_TYPE {
        return Err(SignatureError::UnknownType(p.critical.type_));
    }
    let digest = p.critical.image.docker_manifest_digest;
    let hex_ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !hex_ok {
        return Err(SignatureError::BadDigest(digest));
    }
    Ok((digest, p.critical.identity.docker_reference))
}

/// `sha256:<hex>` of a manifest's bytes.
pub fn manifest_digest(manifest: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(manifest)))
}

/// Checks that the manifest the node has is the one that was signed.
pub fn check_manifest(v: &Verified, manifest: &[u8]) -> Result<(), SignatureError> {
    let actual = manifest_digest(manifest);
    if actual != v.manifest_digest {
        return Err(SignatureError::DigestMismatch {
            signed: v.manifest_digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// The payload cosign signs for `reference` at `manifest_digest`.
pub fn payload(reference: &str, manifest_digest: &str) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: reference.to_string(),
            },
            image: Image {
                docker_manifest_digest: manifest_digest.to_string(),
            },
            type_: PAYLOAD_TYPE.to_string(),
        },
        optional: None,
    })
}

/// Signs `payload` (base64 DER ECDSA P-256 / SHA-256, as `cosign sign-blob` prints).
pub fn sign(payload: &[u8], key: &PKey<Private>) -> Result<String, openssl::error::ErrorStack> {
    let mut s = Signer::new(MessageDigest::sha256(), key)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(s.sign_oneshot_to_vec(payload)?))
}

/// A new ECDSA P-256 signing key.
pub fn generate_key() -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(k: &PKey<Private>, name: &str) -> TrustedKey {
        TrustedKey::from_pem(name, &k.public_key_to_pem().expect("pem")).expect("key")
    }

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"layers":[]}"#;

    #[test]
    fn signed_payload_verifies_and_names_the_manifest() {
        let k = generate_key().expect("key");
        let p = payload("keel/hello", &manifest_digest(MANIFEST)).expect("payload");
        let sig = sign(&p, &k).expect("sign");
        let v = verify(&p, &sig, &[trusted(&k, "ops")]).expect("verify");
        assert_eq!(v.key, "ops");
        assert_eq!(v.reference, "keel/hello");
        check_manifest(&v, MANIFEST).expect("same manifest");
        let e = check_manifest(&v, br#"{"schemaVersion":2}"#).expect_err("other manifest");
        assert!(matches!(e, SignatureError::DigestMismatch { .. }), "{e}");
    }

    #[test]
    fn refusals_name_the_reason() {
        let k = generate_key().expect("key");
        let other = generate_key().expect("key");
        let p = payload("keel/hello", &manifest_digest(MANIFEST)).expect("payload");
        let sig = sign(&p, &k).expect("sign");
        let cases: Vec<(&str, Vec<u8>, String, SignatureError)> = vec![
            (
                "wrong key",
                p.clone(),
                sig.clone(),
                SignatureError::NoKeyMatches(1),
            ),
            (
                "payload changed",
                {
                    let mut q = p.clone();
                    let n = q.len() - 3;
                    q[n] ^= 1;
                    q
                },
                sig.clone(),
                SignatureError::NoKeyMatches(1),
            ),
            (
                "garbage signature",
                p.clone(),
                "%%%".into(),
                SignatureError::NotBase64(String::new()),
            ),
            (
                "empty signature",
                p.clone(),
                String::new(),
                SignatureError::BadLength,
            ),
            (
                "truncated signature",
                p.clone(),
                {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(&sig)
                        .expect("b64");
                    base64::engine::general_purpose::STANDARD.encode(&raw[..raw.len() / 2])
                },
                SignatureError::NoKeyMatches(1),
            ),
        ];
        for (name, payload, sig, want) in cases {
            let keys = if name == "wrong key" {
                vec![trusted(&other, "other")]
            } else {
                vec![trusted(&k, "ops")]
            };
            let got = verify(&payload, &sig, &keys).expect_err(name);
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{name}: {got}"
            );
        }
    }

    #[test]
    fn signed_but_foreign_payloads_are_refused() {
        let k = generate_key().expect("key");
        let keys = [trusted(&k, "ops")];
        let other_type = br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"type":"atomic container signature"},"optional":null}"#;
        let e = verify(other_type, &sign(other_type, &k).expect("sign"), &keys).expect_err("type");
        assert!(matches!(e, SignatureError::UnknownType(_)), "{e}");
        let bad_digest = br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"md5:00"},"type":"cosign container image signature"},"optional":null}"#;
        let e =
            verify(bad_digest, &sign(bad_digest, &k).expect("sign"), &keys).expect_err("digest");
        assert!(matches!(e, SignatureError::BadDigest(_)), "{e}");
        let not_json = b"hello";
        let e = verify(not_json, &sign(not_json, &k).expect("sign"), &keys).expect_err("json");
        assert!(matches!(e, SignatureError::Payload(_)), "{e}");
    }

    /// Fixtures made by the real cosign (tests/fixtures/cosign/regenerate).
    mod cosign {
        use super::*;
        const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cosign/");

        fn read(name: &str) -> Vec<u8> {
            std::fs::read(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        }
        fn key(name: &str) -> TrustedKey {
            TrustedKey::from_pem(name, &read(name)).expect("cosign public key")
        }
        fn sig(name: &str) -> String {
            String::from_utf8(read(name)).expect("utf-8")
        }

        #[test]
        fn a_cosign_signature_verifies_and_names_the_manifest() {
            let v = verify(
                &read("payload.json"),
                &sig("payload.json.sig"),
                &[key("cosign.pub")],
            )
            .expect("cosign's signature verifies");
            assert_eq!(v.key, "cosign.pub");
            assert_eq!(v.reference, "keel/fixture");
            check_manifest(&v, &read("manifest.json")).expect("names manifest.json");
        }

        #[test]
        fn payload_digest_mismatch_is_refused() {
            let v = verify(
                &read("payload.json"),
                &sig("payload.json.sig"),
                &[key("cosign.pub")],
            )
            .expect("verifies");
            let mut other = read("manifest.json");
            other.push(b' ');
            let e = check_manifest(&v, &other).expect_err("another manifest");
            assert!(matches!(e, SignatureError::DigestMismatch { .. }), "{e}");
        }

        #[test]
        fn another_cosign_key_is_refused() {
            let e = verify(
                &read("payload.json"),
                &sig("payload.json.other.sig"),
                &[key("cosign.pub")],
            )
            .expect_err("other key");
            assert_eq!(e, SignatureError::NoKeyMatches(1));
            // ... and accepted when that key is trusted.
            verify(
                &read("payload.json"),
                &sig("payload.json.other.sig"),
                &[key("cosign.pub"), key("other.pub")],
            )
            .expect("other key trusted");
        }

        #[test]
        fn truncated_and_garbage_signatures_are_refused() {
            let good = sig("payload.json.sig");
            let raw = base64::engine::general_purpose::STANDARD
                .decode(good.trim())
                .expect("b64");
            let truncated = base64::engine::general_purpose::STANDARD.encode(&raw[..raw.len() - 4]);
            let keys = [key("cosign.pub")];
            let p = read("payload.json");
            assert_eq!(
                verify(&p, &truncated, &keys).expect_err("truncated"),
                SignatureError::NoKeyMatches(1)
            );
            assert!(matches!(
                verify(&p, "not base64!", &keys),
                Err(SignatureError::NotBase64(_))
            ));
            let garbage = base64::engine::general_purpose::STANDARD.encode([0x30u8; 70]);
            assert_eq!(
                verify(&p, &garbage, &keys).expect_err("garbage"),
                SignatureError::NoKeyMatches(1)
            );
            // A changed payload no longer matches cosign's signature.
            let mut changed = p.clone();
            changed[10] ^= 1;
            assert_eq!(
                verify(&changed, &good, &keys).expect_err("changed"),
                SignatureError::NoKeyMatches(1)
            );
        }

        #[test]
        fn unknown_payload_type_is_refused_even_when_signed() {
            let e = verify(
                &read("payload-unknown-type.json"),
                &sig("payload-unknown-type.json.sig"),
                &[key("cosign.pub")],
            )
            .expect_err("unknown type");
            assert!(
                matches!(e, SignatureError::UnknownType(ref t) if t == "atomic container signature"),
                "{e}"
            );
        }
    }

    #[test]
    fn only_p256_ecdsa_keys_are_trusted() {
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
        let e = TrustedKey::from_pem("rsa", &rsa.public_key_to_pem().expect("pem"))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not an ECDSA key"), "{e}");
    }
}
