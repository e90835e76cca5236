//! Attestation's TPM cryptography against real (software) TPMs: swtpm, one per TPM a test
//! needs, on loopback. What the verifier computes without a TPM (MakeCredential, import blobs,
//! quote checks) must work with what a TPM does, and must fail on every other TPM, key or state.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::swtpm::SoftTpm;

use keel::attest::{qualifying_data, tpm2};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use sha2::{Digest, Sha256};

#[test]
fn credential_activates_on_its_tpm_and_key_only() {
    let a = SoftTpm::start();
    let b = SoftTpm::start();
    let mut tpm_a = a.open();
    let mut tpm_b = b.open();
    let ek_a = tpm2::EkPublic::parse(tpm_a.ek_public()).expect("the TPM's EK is the default");
    let ak_a = tpm_a.create_ak().expect("AK");
    let ak_pub = tpm2::AkPublic::parse(&ak_a.public).expect("the TPM's AK passes the checks");

    let secret = [0x5au8; 32];
    let (blob, seed) = tpm2::make_credential(&ek_a, &ak_pub.name(), &secret).expect("make");
    let got = tpm_a
        .activate(&ak_a, &blob, &seed)
        .expect("activation on its TPM");
    assert_eq!(got, secret);

    // Another TPM, holding its own AK, cannot release it (its EK cannot decrypt the seed).
    let ak_b = tpm_b.create_ak().expect("AK b");
    let err = tpm_b
        .activate(&ak_b, &blob, &seed)
        .expect_err("another TPM");
    assert!(
        format!("{err:#}").contains("activating the credential"),
        "{err:#}"
    );

    // The right TPM but another key than the one named: the TPM refuses.
    let other_ak = tpm_a.create_ak().expect("second AK");
    assert!(tpm_a.activate(&other_ak, &blob, &seed).is_err());

    // A changed byte anywhere in the blob breaks its integrity check.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(tpm_a.activate(&ak_a, &bad, &seed).is_err());
}

#[test]
fn ek_hash_is_the_one_keel_agent_reports() {
    let a = SoftTpm::start();
    let tpm = a.open();
    let ek = tpm2::EkPublic::parse(tpm.ek_public()).expect("ek");
    let agent = keel::node::agent::tpm::spki_sha256(&ek.modulus, 65537).expect("agent's hash");
    assert_eq!(ek.sha256().expect("hash"), agent);
    assert!(ek
        .pem()
        .expect("pem")
        .starts_with("-----BEGIN PUBLIC KEY-----"));
}

#[test]
fn a_tpm_quote_verifies_and_its_tampered_forms_do_not() {
    let a = SoftTpm::start();
    let mut tpm = a.open();
    let ak = tpm.create_ak().expect("AK");
    let ak_pub = tpm2::AkPublic::parse(&ak.public).expect("ak");
    let pcrs = [0u32, 4, 7, 11, 12, 13, 15];
    tpm.extend(11, Sha256::digest(b"enter-initrd").into())
        .expect("extend");
    let q = qualifying_data(b"nonce", b"secret", b"csr", "node1");
    let out = tpm.quote(&ak, &q, &pcrs).expect("quote");
    let quote = tpm2::verify_quote(&ak_pub, &out.attest, &out.signature, &q, &pcrs, &out.values)
        .expect("a TPM's quote verifies");
    assert_eq!(quote.extra_data, q);

    let other = qualifying_data(b"nonce2", b"secret", b"csr", "node1");
    assert_eq!(
        tpm2::verify_quote(
            &ak_pub,
            &out.attest,
            &out.signature,
            &other,
            &pcrs,
            &out.values
        ),
        Err(tpm2::QuoteError::WrongExtraData)
    );
    let mut lied = out.values.clone();
    lied[3] = [0u8; 32];
    assert_eq!(
        tpm2::verify_quote(&ak_pub, &out.attest, &out.signature, &q, &pcrs, &lied),
        Err(tpm2::QuoteError::WrongDigest)
    );
    assert_eq!(
        tpm2::verify_quote(
            &ak_pub,
            &out.attest,
            &out.signature,
            &q,
            &[0, 4, 7, 11, 12, 13],
            &out.values[..6]
        ),
        Err(tpm2::QuoteError::WrongSelection)
    );
    let ak2 = tpm.create_ak().expect("AK 2");
    let ak2_pub = tpm2::AkPublic::parse(&ak2.public).expect("ak2");
    assert_eq!(
        tpm2::verify_quote(
            &ak2_pub,
            &out.attest,
            &out.signature,
            &q,
            &pcrs,
            &out.values
        ),
        Err(tpm2::QuoteError::BadSignature)
    );
}

fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey")
}

fn public(k: &PKey<Private>) -> PKey<openssl::pkey::Public> {
    PKey::public_key_from_pem(&k.public_key_to_pem().expect("pem")).expect("public")
}

fn sign(k: &PKey<Private>, pol: &[u8; 32]) -> Vec<u8> {
    let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), k).expect("signer");
    s.sign_oneshot_to_vec(pol).expect("sign")
}

/// The sealed issuer's binding: PolicyAuthorize by the operator's boot key (PCR 11 in a state
/// it signed) and PolicyPCR on 12 and 13 (no command line, credential or extension from
/// outside the UKI; the provisioning config it was made for).
#[test]
fn an_imported_secret_opens_only_in_the_signed_state() {
    let a = SoftTpm::start();
    let b = SoftTpm::start();
    let mut tpm = a.open();
    let boot_key = rsa_key();
    let ek = tpm2::EkPublic::parse(tpm.ek_public()).expect("ek");
    let key_name = tpm2::name(&tpm2::rsa_verify_key_public(&public(&boot_key)).expect("key"));

    // The node boots: PCR 11 reaches a state, PCR 12 gets the provisioning measurement.
    tpm.extend(11, Sha256::digest(b"a uki").into()).expect("11");
    tpm.extend(12, Sha256::digest(b"keel-ignition:sha256:00").into())
        .expect("12");
    let now = tpm.read_pcrs(&[11, 12, 13]).expect("read");
    let pol = keel::trust::measure::policy_pcr_digest(&now[0]);
    let policy = tpm2::policy_pcr(&tpm2::policy_authorize(&key_name), &[12, 13], &now[1..]);
    let blob = tpm2::seal_for_import(&ek, &policy, b"the issuer key").expect("seal");

    let got = tpm
        .unseal_imported(
            &blob,
            &public(&boot_key),
            &pol,
            &sign(&boot_key, &pol),
            &[12, 13],
        )
        .expect("opens in the signed state");
    assert_eq!(got.0, b"the issuer key");

    // A state signed by another key (an attacker's .pcrsig).
    let other = rsa_key();
    let err = tpm
        .unseal_imported(&blob, &public(&other), &pol, &sign(&other, &pol), &[12, 13])
        .expect_err("another key");
    assert!(format!("{err:#}").contains("unseal"), "{err:#}");
    // The right key, but a signature over another state than PCR 11's.
    let wrong = keel::trust::measure::policy_pcr_digest(&[9u8; 32]);
    let err = tpm
        .unseal_imported(
            &blob,
            &public(&boot_key),
            &wrong,
            &sign(&boot_key, &wrong),
            &[12, 13],
        )
        .expect_err("signed state differs from PCR 11");
    assert!(format!("{err:#}").contains("PolicyAuthorize"), "{err:#}");
    // The same signed state given without the PCR 12/13 step.
    assert!(tpm
        .unseal_imported(&blob, &public(&boot_key), &pol, &sign(&boot_key, &pol), &[])
        .is_err());

    // A command line from outside the UKI: PCR 12 measured once more.
    tpm.extend(12, Sha256::digest(b"init=/bin/sh").into())
        .expect("12 again");
    let err = tpm
        .unseal_imported(
            &blob,
            &public(&boot_key),
            &pol,
            &sign(&boot_key, &pol),
            &[12, 13],
        )
        .expect_err("PCR 12 changed");
    assert!(format!("{err:#}").contains("unseal"), "{err:#}");

    // PCR 11 moved on (an unsigned UKI or an unsigned phase).
    tpm.extend(11, Sha256::digest(b"more").into())
        .expect("11 again");
    assert!(tpm
        .unseal_imported(
            &blob,
            &public(&boot_key),
            &pol,
            &sign(&boot_key, &pol),
            &[12, 13]
        )
        .is_err());

    // The blob on another machine: its TPM cannot import it.
    let mut tpm_b = b.open();
    let err = tpm_b
        .unseal_imported(
            &blob,
            &public(&boot_key),
            &pol,
            &sign(&boot_key, &pol),
            &[12, 13],
        )
        .expect_err("another TPM");
    assert!(format!("{err:#}").contains("importing"), "{err:#}");
}
