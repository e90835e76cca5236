//! The attestation wire protocol: one TLS connection is one session of four messages, each a
//! frame (a u32 big-endian length, at most [`MAX_FRAME`] bytes, then JSON).
//!
//! ```text
//! node → verifier  Hello     name, EK, AK, certificate request, config hash
//! verifier → node  Challenge credential (for that EK and AK), nonce, PCRs to quote
//! node → verifier  Evidence  proof of activation, quote, PCR values, event logs, .pcrsig
//! verifier → node  Admitted  certificate chain, or Refused with the reason
//! ```
//!
//! Nothing of a session outlives its connection: the nonce and the credential's secret live in
//! the verifier's stack frame, so evidence from one connection is worthless in another.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The largest frame either side accepts (event logs are tens of kilobytes).
pub const MAX_FRAME: usize = 1 << 20;
pub const VERSION: u32 = 1;
/// The TCP port verifiers listen on (2379/2380 are etcd's; 2381 is kubeadm's etcd metrics).
pub const PORT: u16 = 2382;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("the message does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the message is not valid: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hello {
    pub version: u32,
    /// The machine name the node asks a certificate for (its entry in the admission list).
    pub name: String,
    /// TPMT_PUBLIC of the endorsement key.
    #[serde(with = "hex::serde")]
    pub ek_public: Vec<u8>,
    /// TPMT_PUBLIC of the attestation key made for this session.
    #[serde(with = "hex::serde")]
    pub ak_public: Vec<u8>,
    /// PKCS#10 request (DER) for the node's TLS key.
    #[serde(with = "hex::serde")]
    pub csr: Vec<u8>,
    /// sha256 (hex) of the provisioning config as measured into PCR 12; empty: none.
    pub config_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Challenge {
    #[serde(with = "hex::serde")]
    pub credential_blob: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub encrypted_seed: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    /// sha256-bank PCRs to quote, ascending.
    pub pcrs: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Evidence {
    /// TPMS_ATTEST and TPMT_SIGNATURE of the quote.
    #[serde(with = "hex::serde")]
    pub attest: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// The quoted PCR values, in the challenge's order (hex).
    pub pcr_values: Vec<String>,
    /// The firmware's TCG2 event log.
    #[serde(with = "hex::serde")]
    pub firmware_log: Vec<u8>,
    /// systemd's userspace measurement log (tpm2-measure.log).
    pub userspace_log: String,
    /// The running UKI's `.pcrsig` (JSON text).
    pub pcrsig: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Answer {
    /// The leaf certificate and its issuer (PEM), and when it expires (Unix seconds).
    Admitted {
        chain_pem: String,
        not_after: i64,
        verifier: String,
    },
    Refused {
        reason: String,
    },
}

/// Server's first answer: a challenge, or a refusal before any TPM work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum ChallengeOrRefusal {
    Challenge(Challenge),
    Refused { reason: String },
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtocolError::TooLarge(body.len()))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's bytes: the length is checked before anything is allocated.
pub fn read_frame_bytes(r: &mut impl Read) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Parses a message (what the verifier does with a frame; the fuzz target's entry).
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtocolError> {
    Ok(serde_json::from_slice(body)?)
}

pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ProtocolError> {
    parse(&read_frame_bytes(r)?)
}

impl Evidence {
    /// The PCR values as bytes; each must be 32 bytes of hex.
    pub fn values(&self) -> Result<Vec<[u8; 32]>, ProtocolError> {
        self.pcr_values
            .iter()
            .map(|v| {
                hex::decode(v)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or_else(|| ProtocolError::Invalid(format!("PCR value `{v}`")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused_before_reading() {
        let c = Challenge {
            credential_blob: vec![1, 2],
            encrypted_seed: vec![3],
            nonce: vec![4; 32],
            pcrs: vec![11],
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &c).expect("write");
        let back: Challenge = read_frame(&mut buf.as_slice()).expect("read");
        assert_eq!(back, c);
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame::<Challenge>(&mut huge.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
        // Unknown fields are refused, not ignored.
        let extra = br#"{"credential-blob":"","encrypted-seed":"","nonce":"","pcrs":[],"x":1}"#;
        assert!(parse::<Challenge>(extra).is_err());
    }
}
