//! What a verifier runs on bytes from the network: frame parsing, the Hello checks (EK, AK and
//! certificate request parsers) and the evidence checks of a real session (quote and signature
//! parsers, event logs, .pcrsig), up to the boot-state verdict.
#![no_main]
use keel::attest::admission::{Admission, Entry, Role};
use keel::attest::protocol::{self, Evidence, Hello};
use keel::attest::tpm2::{self, Writer};
use keel::node::agent::boot_state::TrustedKey;
use keel::node::attest::verifier::{Issuer, Verifier};
use libfuzzer_sys::fuzz_target;
use openssl::pkey::{PKey, Private};
use std::sync::OnceLock;

struct Fixture {
    admission: Admission,
    keys: Vec<TrustedKey>,
    issuer: Issuer,
    hello: Hello,
}

fn p256() -> PKey<Private> {
    let g = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::generate(&g).unwrap()).unwrap()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // An EK of the default template around a software RSA key.
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let mut ek = Writer::default();
        ek.u16(tpm2::TPM_ALG_RSA)
            .u16(tpm2::TPM_ALG_SHA256)
            .u32(tpm2::EK_ATTRIBUTES)
            .sized(&tpm2::EK_POLICY)
            .u16(tpm2::TPM_ALG_AES)
            .u16(128)
            .u16(tpm2::TPM_ALG_CFB)
            .u16(tpm2::TPM_ALG_NULL)
            .u16(2048)
            .u32(0)
            .sized(&rsa.n().to_vec());
        let ek_hash = tpm2::EkPublic::parse(&ek.0).unwrap().sha256().unwrap();
        // An AK around a software P-256 key.
        let ak_key = p256();
        let ec = ak_key.ec_key().unwrap();
        let mut ctx = openssl::bn::BigNumContext::new().unwrap();
        let (mut x, mut y) = (openssl::bn::BigNum::new().unwrap(), openssl::bn::BigNum::new().unwrap());
        ec.public_key().affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx).unwrap();
        let mut ak = Writer::default();
        ak.u16(tpm2::TPM_ALG_ECC)
            .u16(tpm2::TPM_ALG_SHA256)
            .u32(tpm2::AK_ATTRIBUTES)
            .sized(&[])
            .u16(tpm2::TPM_ALG_NULL)
            .u16(tpm2::TPM_ALG_ECDSA)
            .u16(tpm2::TPM_ALG_SHA256)
            .u16(tpm2::TPM_ECC_NIST_P256)
            .u16(tpm2::TPM_ALG_NULL)
            .sized(&x.to_vec_padded(32).unwrap())
            .sized(&y.to_vec_padded(32).unwrap());
        let node_key = p256();
        let csr = keel::node::attest::session::csr("node3", &node_key).unwrap();
        let boot = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let boot_pub = PKey::public_key_from_pem(&boot.public_key_to_pem().unwrap()).unwrap();
        let issuer_key = p256();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, "issuer").unwrap();
        let name = name.build();
        let mut b = openssl::x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&issuer_key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(30).unwrap()).unwrap();
        b.sign(&issuer_key, openssl::hash::MessageDigest::sha256()).unwrap();
        Fixture {
            admission: Admission {
                cluster: "fuzz".into(),
                serial: 1,
                cert_ttl: 600,
                machines: vec![Entry {
                    name: "node3".into(),
                    ek_sha256: ek_hash,
                    ip: "10.77.0.3".parse().unwrap(),
                    role: Role::Client,
                    config_sha256: None,
                    subnet: None,
                }],
                deny_pcr11: vec![],
                allow_secure_boot_off: false,
            },
            keys: vec![TrustedKey {
                file: keel::node::agent::boot_state::BOOT_KEY.into(),
                fingerprint: keel::trust::measure::key_fingerprint(&boot_pub).unwrap(),
                key: boot_pub,
            }],
            issuer: Issuer {
                cert: b.build(),
                key: issuer_key,
            },
            hello: Hello {
                version: protocol::VERSION,
                name: "node3".into(),
                ek_public: ek.0,
                ak_public: ak.0,
                csr,
                config_sha256: String::new(),
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let v = Verifier {
        admission: &f.admission,
        keys: &f.keys,
        issuer: &f.issuer,
        name: "node1",
        db_cert: None,
    };
    // A frame as read from a socket.
    let _ = protocol::read_frame_bytes(&mut &data[..]);
    // A Hello from the network.
    if let Ok(h) = protocol::parse::<Hello>(data) {
        let _ = v.challenge(&h);
    }
    // The raw TPM structures.
    let _ = tpm2::EkPublic::parse(data);
    let _ = tpm2::AkPublic::parse(data);
    let _ = tpm2::Quote::parse(data);
    let _ = tpm2::parse_ecdsa_signature(data);
    // Evidence answering a real session's challenge.
    if let Ok(e) = protocol::parse::<Evidence>(data) {
        let (pending, _) = v.challenge(&f.hello).expect("the fixture's hello is valid");
        if v.admit(&pending, &e, 1_800_000_000).is_ok() {
            panic!("evidence from the fuzzer was admitted");
        }
    }
});
