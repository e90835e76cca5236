//! The cluster's TLS material: one CA per cluster and, per node, a certificate that serves both
//! as etcd's server/peer certificate and as the client certificate of keel-net and etcdctl.
//! ECDSA P-256, SHA-256; node certificates name the node's addresses as IP SANs.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
#[error("making the {what} certificate")]
pub struct PkiError {
    what: String,
    #[source]
    source: openssl::error::ErrorStack,
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

fn new_key() -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn serial() -> Result<openssl::asn1::Asn1Integer, openssl::error::ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

/// A certificate builder with the fields every certificate here shares: v3, a random serial,
/// subject CN, the issuer (`None`: self-signed), the public key and `days` of validity.
fn builder(
    common_name: &str,
    issuer: Option<&X509>,
    key: &PKey<Private>,
    days: u32,
) -> Result<X509Builder, openssl::error::ErrorStack> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    match issuer {
        Some(ca) => b.set_issuer_name(ca.subject_name())?,
        None => b.set_issuer_name(&name)?,
    }
    b.set_pubkey(key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(days)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    Ok(b)
}

/// A self-signed CA valid for `days`.
pub fn new_ca(common_name: &str, days: u32) -> Result<CertPair, PkiError> {
    let build = || -> Result<CertPair, openssl::error::ErrorStack> {
        let key = new_key()?;
        let mut b = builder(common_name, None, &key, days)?;
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
        b.append_extension(ski)?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(CertPair {
            cert_pem: b.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    };
    build().map_err(|source| PkiError {
        what: format!("CA {common_name}"),
        source,
    })
}

/// An issuer: an intermediate CA signed by `ca` that may sign leaves only (path length 0), for
/// one verifier. Returns the certificate and its key; the key is what `keel cluster init` seals
/// to that member's TPM and never writes anywhere in plain.
pub fn new_issuer(ca: &CertPair, common_name: &str, days: u32) -> Result<CertPair, PkiError> {
    let build = || -> Result<CertPair, openssl::error::ErrorStack> {
        let ca_cert = X509::from_pem(&ca.cert_pem)?;
        let ca_key = PKey::private_key_from_pem(&ca.key_pem)?;
        let key = new_key()?;
        let mut b = builder(common_name, Some(&ca_cert), &key, days)?;
        b.append_extension(BasicConstraints::new().critical().ca().pathlen(0).build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&ca_cert), None))?;
        b.append_extension(ski)?;
        b.sign(&ca_key, MessageDigest::sha256())?;
        Ok(CertPair {
            cert_pem: b.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    };
    build().map_err(|source| PkiError {
        what: format!("issuer {common_name}"),
        source,
    })
}

/// A certificate for a node (server and client use), signed by `ca`, naming `ips` and `dns`.
pub fn issue(
    ca: &CertPair,
    common_name: &str,
    ips: &[IpAddr],
    dns: &[&str],
    days: u32,
) -> Result<CertPair, PkiError> {
    let build = || -> Result<CertPair, openssl::error::ErrorStack> {
        let ca_cert = X509::from_pem(&ca.cert_pem)?;
        let ca_key = PKey::private_key_from_pem(&ca.key_pem)?;
        let key = new_key()?;
        let mut b = builder(common_name, Some(&ca_cert), &key, days)?;
        b.append_extension(BasicConstraints::new().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()?,
        )?;
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()?,
        )?;
        let mut san = SubjectAlternativeName::new();
        for ip in ips {
            san.ip(&ip.to_string());
        }
        for d in dns {
            san.dns(d);
        }
        let san = san.build(&b.x509v3_context(Some(&ca_cert), None))?;
        b.append_extension(san)?;
        b.sign(&ca_key, MessageDigest::sha256())?;
        Ok(CertPair {
            cert_pem: b.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    };
    build().map_err(|source| PkiError {
        what: format!("node {common_name}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_chain_to_the_ca() {
        let ca = new_ca("keel test CA", 30).unwrap();
        let ip: IpAddr = "192.168.77.11".parse().unwrap();
        let node = issue(&ca, "node1", &[ip], &["localhost"], 30).unwrap();
        let ca_cert = X509::from_pem(&ca.cert_pem).unwrap();
        let cert = X509::from_pem(&node.cert_pem).unwrap();
        assert!(cert.verify(&ca_cert.public_key().unwrap()).unwrap());
        let other = new_ca("other CA", 30).unwrap();
        assert!(!cert
            .verify(
                &X509::from_pem(&other.cert_pem)
                    .unwrap()
                    .public_key()
                    .unwrap()
            )
            .unwrap());
        let sans: Vec<String> = cert
            .subject_alt_names()
            .unwrap()
            .iter()
            .filter_map(|n| {
                n.ipaddress()
                    .map(|b| format!("{b:?}"))
                    .or(n.dnsname().map(str::to_string))
            })
            .collect();
        assert_eq!(sans, ["[192, 168, 77, 11]", "localhost"]);
    }
}
