//! The attested half of `keel cluster init`: the admission list, each node's attestation
//! settings, and for the first members an issuer (an intermediate CA) whose key is sealed to the
//! member's TPM. Nothing written here is secret: the issuer key exists in plain only in this
//! process's memory, and leaves it sealed to one TPM, openable only when PCR 11 is in a state
//! the operator's boot key signed and PCRs 12 and 13 hold exactly that member's provisioning.

use super::init::{self, AttestInit, ClusterRecord, NodeCreds, NodeSpec};
use super::pki::{self, CertPair};
use crate::attest::admission::{Admission, Entry, Role};
use crate::attest::protocol::PORT;
use crate::attest::{tpm2, ADMISSION_PATH, ADMISSION_SIG_PATH, SEALED_ISSUER_PATH};
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Issuers live a year: `keel cluster init` again (or a future rotate command) renews them.
pub const ISSUER_DAYS: u32 = 365;

/// The admission list for `nodes`: all initial nodes are members, each pinned to its config.
pub fn admission(
    nodes: &[NodeSpec],
    a: &AttestInit,
    serial: u64,
    measured: &BTreeMap<String, String>,
    subnets: &BTreeMap<String, ipnet::Ipv4Net>,
) -> Result<Admission> {
    let machines = nodes
        .iter()
        .map(|n| {
            let ek = a.eks.get(&n.name).context("an EK for every node")?;
            Ok(Entry {
                name: n.name.clone(),
                ek_sha256: ek.sha256()?,
                ip: IpAddr::V4(n.ip),
                role: Role::Member,
                config_sha256: measured.get(&n.name).cloned(),
                subnet: subnets.get(&n.name).copied(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let adm = Admission {
        cluster: String::new(),
        serial,
        cert_ttl: a.cert_ttl,
        machines,
        deny_pcr11: vec![],
        allow_secure_boot_off: a.allow_secure_boot_off,
    };
    adm.check()?;
    Ok(adm)
}

/// The policy a member's issuer is sealed to: PolicyAuthorize by the boot key (PCR 11 in a state
/// it signed), then PolicyPCR over PCRs 12 and 13 holding `pcr12` and nothing.
pub fn issuer_policy(
    boot_key: &openssl::pkey::PKey<openssl::pkey::Public>,
    pcr12: [u8; 32],
) -> Result<[u8; 32]> {
    let key_name = tpm2::name(&tpm2::rsa_verify_key_public(boot_key)?);
    Ok(tpm2::policy_pcr(
        &tpm2::policy_authorize(&key_name),
        &[12, 13],
        &[pcr12, [0u8; 32]],
    ))
}

/// One node's config before the files that depend on its measurement are filled in.
struct Draft {
    name: String,
    cfg: serde_json::Value,
    issuer_key_pem: Option<Vec<u8>>,
    measured: String,
}

fn draft(
    n: &NodeSpec,
    nodes: &[NodeSpec],
    record: &ClusterRecord,
    ca: &CertPair,
    a: &AttestInit,
) -> Result<Draft> {
    let is_issuer = a.issuers.contains(&n.name);
    let verifiers: Vec<SocketAddr> = nodes
        .iter()
        .filter(|m| a.issuers.contains(&m.name))
        .map(|m| SocketAddr::new(IpAddr::V4(m.ip), PORT))
        .collect();
    let settings = crate::node::attest::service::AttestConfig {
        name: n.name.clone(),
        verifiers,
        issuer: is_issuer,
    };
    // Placeholders: the measurement leaves these files' contents out (ELIDED_PATHS).
    let mut extra = vec![
        init::file(
            "/etc/keel/attest/attest.json",
            &serde_json::to_vec_pretty(&settings)?,
            0o644,
            None,
        ),
        init::file(ADMISSION_PATH, b"", 0o644, None),
        init::file(ADMISSION_SIG_PATH, b"", 0o644, None),
    ];
    let mut issuer_key_pem = None;
    if is_issuer {
        let issuer = pki::new_issuer(ca, &format!("keel issuer {}", n.name), ISSUER_DAYS)?;
        extra.push(init::file(
            "/etc/keel/attest/issuer.pem",
            &issuer.cert_pem,
            0o644,
            None,
        ));
        extra.push(init::file(SEALED_ISSUER_PATH, b"", 0o600, None));
        issuer_key_pem = Some(issuer.key_pem);
    }
    let cfg = init::node_config(n, nodes, "new", record, ca, NodeCreds::Attested(extra))?;
    let measured = crate::attest::measured_config_sha256(&serde_json::to_vec(&cfg)?);
    Ok(Draft {
        name: n.name.clone(),
        cfg,
        issuer_key_pem,
        measured,
    })
}

fn fill(cfg: &mut serde_json::Value, path: &str, contents: &[u8]) -> Result<()> {
    let files = cfg
        .pointer_mut("/storage/files")
        .and_then(serde_json::Value::as_array_mut)
        .context("config without files")?;
    for f in files.iter_mut() {
        if f.get("path").and_then(serde_json::Value::as_str) == Some(path) {
            f["contents"] = json!({ "source": init::data_url(contents) });
        }
    }
    Ok(())
}

/// Every node's Ignition config (name, bytes), and the signed admission list (bytes,
/// signature) that pins each node to its config.
#[allow(clippy::type_complexity)]
pub fn configs(
    nodes: &[NodeSpec],
    record: &ClusterRecord,
    ca: &CertPair,
    a: &AttestInit,
) -> Result<(Vec<(String, Vec<u8>)>, Vec<u8>, String)> {
    let drafts = nodes
        .iter()
        .map(|n| draft(n, nodes, record, ca, a))
        .collect::<Result<Vec<_>>>()?;
    let measured: BTreeMap<String, String> = drafts
        .iter()
        .map(|d| (d.name.clone(), d.measured.clone()))
        .collect();
    let list = admission(nodes, a, 1, &measured, &record.subnets)?;
    let ca_key = openssl::pkey::PKey::private_key_from_pem(&ca.key_pem)?;
    let (list_bytes, sig) = list.sign(&ca_key).context("signing the admission list")?;
    let mut out = Vec::new();
    for mut d in drafts {
        fill(&mut d.cfg, ADMISSION_PATH, &list_bytes)?;
        fill(
            &mut d.cfg,
            ADMISSION_SIG_PATH,
            format!("{sig}\n").as_bytes(),
        )?;
        if let Some(key_pem) = &d.issuer_key_pem {
            let pcr12 = crate::node::attest::verifier::expected_pcr12(&d.measured);
            let policy = issuer_policy(&a.boot_key, pcr12)?;
            let key = openssl::pkey::PKey::private_key_from_pem(key_pem)?;
            let scalar = key.ec_key()?.private_key().to_vec_padded(32)?;
            let ek = a.eks.get(&d.name).context("an EK for every node")?;
            let blob = tpm2::seal_for_import(ek, &policy, &scalar)
                .with_context(|| format!("sealing {}'s issuer to its TPM", d.name))?;
            fill(&mut d.cfg, SEALED_ISSUER_PATH, &serde_json::to_vec(&blob)?)?;
        }
        let bytes = serde_json::to_vec_pretty(&d.cfg)?;
        if crate::attest::measured_config_sha256(&bytes) != d.measured {
            anyhow::bail!(
                "{}: the finished config does not measure as its draft",
                d.name
            );
        }
        out.push((d.name, bytes));
    }
    Ok((out, list_bytes, sig))
}
