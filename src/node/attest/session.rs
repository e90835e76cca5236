//! One attestation session over TLS, both ends. The node dials a verifier, checks that the
//! verifier's certificate chains to the cluster's root and names the address it dialled, and
//! runs Hello → Challenge → Evidence → Answer. The verifier serves one session per connection
//! with a deadline, and decides with [`Verifier`].

use super::tpm::Tpm;
use super::verifier::{Admitted, Refusal, Verifier};
use crate::attest::protocol::{
    self, Answer, Challenge, ChallengeOrRefusal, Evidence, Hello, ProtocolError,
};
use crate::attest::qualifying_data;
use anyhow::{bail, Context, Result};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::{X509NameBuilder, X509Req, X509};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a session may take, end to end, on either side.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The boot's logs a node sends with its quote.
#[derive(Debug, Clone, Default)]
pub struct BootLogs {
    pub firmware: Vec<u8>,
    pub userspace: String,
    pub pcrsig: String,
}

impl BootLogs {
    /// Reads them from a node's root (the paths keel-agent boot-state reads).
    pub fn read(root: &std::path::Path) -> Result<BootLogs> {
        use crate::node::agent::boot_state::{FIRMWARE_LOG, PCRSIG, USERSPACE_LOG};
        let fw = root.join(FIRMWARE_LOG);
        let sig = root.join(PCRSIG);
        Ok(BootLogs {
            firmware: std::fs::read(&fw).with_context(|| format!("reading {}", fw.display()))?,
            userspace: std::fs::read_to_string(root.join(USERSPACE_LOG)).unwrap_or_default(),
            pcrsig: std::fs::read_to_string(&sig)
                .with_context(|| format!("reading {} (no .pcrsig in the UKI?)", sig.display()))?,
        })
    }
}

/// A PKCS#10 request for `key` naming `name` (the verifier takes names from its list anyway).
pub fn csr(name: &str, key: &PKey<Private>) -> Result<Vec<u8>> {
    let mut n = X509NameBuilder::new()?;
    n.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, name)?;
    let mut b = X509Req::builder()?;
    b.set_subject_name(&n.build())?;
    b.set_pubkey(key)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build().to_der()?)
}

/// The node's side of a session, TPM work included, independent of the transport.
pub struct NodeSession {
    pub hello: Hello,
    ak: super::tpm::Ak,
}

impl NodeSession {
    pub fn start(tpm: &mut Tpm, name: &str, config_sha256: &str, csr_der: Vec<u8>) -> Result<Self> {
        let ak = tpm.create_ak()?;
        Ok(NodeSession {
            hello: Hello {
                version: protocol::VERSION,
                name: name.to_string(),
                ek_public: tpm.ek_public().to_vec(),
                ak_public: ak.public.clone(),
                csr: csr_der,
                config_sha256: config_sha256.to_string(),
            },
            ak,
        })
    }

    /// Activates the credential and quotes over the session's qualifying data.
    pub fn evidence(&self, tpm: &mut Tpm, c: &Challenge, logs: &BootLogs) -> Result<Evidence> {
        let secret = tpm.activate(&self.ak, &c.credential_blob, &c.encrypted_seed)?;
        let q = qualifying_data(&c.nonce, &secret, &self.hello.csr, &self.hello.name);
        let out = tpm.quote(&self.ak, &q, &c.pcrs)?;
        Ok(Evidence {
            attest: out.attest,
            signature: out.signature,
            pcr_values: out.values.iter().map(hex::encode).collect(),
            firmware_log: logs.firmware.clone(),
            userspace_log: logs.userspace.clone(),
            pcrsig: logs.pcrsig.clone(),
        })
    }

    pub fn finish(self, tpm: &mut Tpm) {
        self.ak.flush(tpm);
    }
}

/// A TLS connection to the verifier at `addr`, whose certificate must chain to `root_pem` and
/// name `addr`'s IP.
pub fn connect(addr: SocketAddr, root_pem: &[u8]) -> Result<openssl::ssl::SslStream<TcpStream>> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    let store = b.cert_store_mut();
    for c in X509::stack_from_pem(root_pem).context("the cluster's root certificate")? {
        store.add_cert(c)?;
    }
    b.set_verify(SslVerifyMode::PEER);
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to the verifier at {addr}"))?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    tcp.set_write_timeout(Some(DEADLINE))?;
    b.build()
        .connect(&addr.ip().to_string(), tcp)
        .map_err(|e| anyhow::anyhow!("TLS with the verifier at {addr}: {e}"))
}

/// Runs a whole session on `stream` and returns the verifier's answer. The session's
/// attestation key leaves the TPM however the session ends.
pub fn attest<S: Read + Write>(
    stream: &mut S,
    tpm: &mut Tpm,
    session: NodeSession,
    logs: &BootLogs,
) -> Result<Answer> {
    let result = (|| -> Result<Answer> {
        protocol::write_frame(stream, &session.hello).context("sending Hello")?;
        let first: ChallengeOrRefusal =
            protocol::read_frame(stream).context("reading the challenge")?;
        let challenge = match first {
            ChallengeOrRefusal::Challenge(c) => c,
            ChallengeOrRefusal::Refused { reason } => return Ok(Answer::Refused { reason }),
        };
        let evidence = session.evidence(tpm, &challenge, logs)?;
        protocol::write_frame(stream, &evidence).context("sending the evidence")?;
        protocol::read_frame(stream).context("reading the answer")
    })();
    session.finish(tpm);
    result
}

/// What one served session ended with, for the verifier's log.
#[derive(Debug)]
pub enum Served {
    Admitted(Admitted),
    Refused { name: String, refusal: Refusal },
}

/// The TLS acceptor for a verifier presenting `chain_pem` (its leaf, then its issuer) and `key`.
pub fn acceptor(chain_pem: &[u8], key: &PKey<Private>) -> Result<SslAcceptor> {
    let mut chain = X509::stack_from_pem(chain_pem).context("the verifier's certificate")?;
    if chain.is_empty() {
        bail!("the verifier has no certificate");
    }
    let leaf = chain.remove(0);
    let mut b = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())?;
    b.set_certificate(&leaf)?;
    for c in chain {
        b.add_extra_chain_cert(c)?;
    }
    b.set_private_key(key)?;
    b.check_private_key()?;
    Ok(b.build())
}

/// Serves one session on an accepted stream; `now` gives the issuing time.
pub fn serve<S: Read + Write>(
    stream: &mut S,
    verifier: &Verifier,
    now: impl Fn() -> i64,
) -> Result<Served, ProtocolError> {
    let hello: Hello = protocol::read_frame(stream)?;
    let name = hello.name.chars().take(64).collect::<String>();
    let (pending, challenge) = match verifier.challenge(&hello) {
        Ok(x) => x,
        Err(refusal) => {
            protocol::write_frame(
                stream,
                &ChallengeOrRefusal::Refused {
                    reason: refusal.to_string(),
                },
            )?;
            return Ok(Served::Refused { name, refusal });
        }
    };
    protocol::write_frame(stream, &ChallengeOrRefusal::Challenge(challenge))?;
    let evidence: Evidence = protocol::read_frame(stream)?;
    match verifier.admit(&pending, &evidence, now()) {
        Ok(a) => {
            protocol::write_frame(
                stream,
                &Answer::Admitted {
                    chain_pem: a.chain_pem.clone(),
                    not_after: a.not_after,
                    verifier: verifier.name.to_string(),
                },
            )?;
            Ok(Served::Admitted(a))
        }
        Err(refusal) => {
            protocol::write_frame(
                stream,
                &Answer::Refused {
                    reason: refusal.to_string(),
                },
            )?;
            Ok(Served::Refused { name, refusal })
        }
    }
}
