//! Event logs that explain a PCR value: the firmware's TCG2 crypto-agile log
//! (`/sys/kernel/security/tpm0/binary_bios_measurements`, where systemd-stub's section
//! measurements land) and systemd's userspace log (`/run/log/systemd/tpm2-measure.log`, JSON-SEQ,
//! where systemd-pcrphase records the boot phases). Parsing is pure; callers read the files.

use serde::Deserialize;

/// `EV_NO_ACTION` events are informational and never extended.
pub const EV_NO_ACTION: u32 = 0x3;
pub const EV_IPL: u32 = 0xD;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventLogError {
    #[error("event log truncated at byte {0}")]
    Truncated(usize),
    #[error(
        "event log does not start with a Spec ID Event03 header (not a TCG2 crypto-agile log)"
    )]
    NotCryptoAgile,
    #[error("event log uses an algorithm 0x{0:04x} it does not declare")]
    UnknownAlgorithm(u16),
}

/// One measurement: PCR, event type, sha256 digest (when the log has that bank), event data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub event_type: u32,
    pub sha256: Option<[u8; 32]>,
    pub data: Vec<u8>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EventLogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(EventLogError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, EventLogError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, EventLogError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

const SHA256_ALG: u16 = 0x000B;

/// Parses a TCG2 crypto-agile event log (little-endian, as Linux exports it).
pub fn parse_tcg2(log: &[u8]) -> Result<Vec<Event>, EventLogError> {
    let mut r = Reader { buf: log, pos: 0 };
    // Header: a TCG_PCR_EVENT (SHA-1 layout) carrying the Spec ID Event03 structure.
    let _pcr = r.u32()?;
    let _type = r.u32()?;
    r.take(20)?;
    let size = r.u32()? as usize;
    let spec = r.take(size)?;
    if spec.len() < 28 || &spec[..16] != b"Spec ID Event03\0" {
        return Err(EventLogError::NotCryptoAgile);
    }
    let mut sr = Reader { buf: spec, pos: 24 };
    let count = sr.u32()?;
    let mut sizes = Vec::new();
    for _ in 0..count {
        let alg = sr.u16()?;
        let size = sr.u16()?;
        sizes.push((alg, size as usize));
    }
    let mut events = Vec::new();
    while r.pos < log.len() {
        // Trailing zero padding ends some logs.
        if log[r.pos..].iter().all(|b| *b == 0) {
            break;
        }
        let pcr = r.u32()?;
        let event_type = r.u32()?;
        let n = r.u32()?;
        let mut sha256 = None;
        for _ in 0..n {
            let alg = r.u16()?;
            let size = sizes
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, s)| *s)
                .ok_or(EventLogError::UnknownAlgorithm(alg))?;
            let d = r.take(size)?;
            if alg == SHA256_ALG && size == 32 {
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                sha256 = Some(a);
            }
        }
        let size = r.u32()? as usize;
        let data = r.take(size)?.to_vec();
        events.push(Event {
            pcr,
            event_type,
            sha256,
            data,
        });
    }
    Ok(events)
}

#[derive(Debug, Deserialize)]
struct UserRecord {
    pcr: u32,
    digests: Vec<UserDigest>,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct UserDigest {
    #[serde(rename = "hashAlg")]
    hash_alg: String,
    digest: String,
}

/// A userspace measurement from systemd's log: PCR, sha256 digest and a description (the phase
/// word for systemd-pcrphase records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    pub pcr: u32,
    pub sha256: Option<[u8; 32]>,
    pub description: String,
}

/// Parses systemd's `tpm2-measure.log` (RFC 7464 JSON text sequences). Records that do not parse
/// are reported by index so a damaged log is not silently replayed short.
pub fn parse_userspace(text: &str) -> Result<Vec<UserEvent>, String> {
    let mut out = Vec::new();
    for (i, rec) in text
        .split('\u{1e}')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .enumerate()
    {
        let r: UserRecord = serde_json::from_str(rec).map_err(|e| format!("record {i}: {e}"))?;
        let sha256 = r
            .digests
            .iter()
            .find(|d| d.hash_alg == "sha256")
            .and_then(|d| hex::decode(&d.digest).ok())
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok());
        let description = r
            .content
            .as_ref()
            .and_then(|c| c.get("string").and_then(|s| s.as_str()).map(String::from))
            .unwrap_or_default();
        out.push(UserEvent {
            pcr: r.pcr,
            sha256,
            description,
        });
    }
    Ok(out)
}

/// The result of replaying the logs for one PCR (sha256 bank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub value: [u8; 32],
    pub firmware_events: usize,
    pub userspace_events: Vec<String>,
}

/// Replays PCR `pcr` from zero through the firmware events, then the userspace events.
pub fn replay(pcr: u32, firmware: &[Event], userspace: &[UserEvent]) -> Result<Replay, String> {
    let mut value = [0u8; 32];
    let mut firmware_events = 0;
    for e in firmware
        .iter()
        .filter(|e| e.pcr == pcr && e.event_type != EV_NO_ACTION)
    {
        let d = e
            .sha256
            .ok_or_else(|| format!("firmware event for PCR {pcr} has no sha256 digest"))?;
        super::measure::extend(&mut value, &d);
        firmware_events += 1;
    }
    let mut names = Vec::new();
    for e in userspace.iter().filter(|e| e.pcr == pcr) {
        let d = e
            .sha256
            .ok_or_else(|| format!("userspace event `{}` has no sha256 digest", e.description))?;
        super::measure::extend(&mut value, &d);
        names.push(e.description.clone());
    }
    Ok(Replay {
        value,
        firmware_events,
        userspace_events: names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// A log as OVMF writes it: Spec ID header declaring sha1 + sha256, then events.
    fn log(events: &[(u32, u32, [u8; 32], &[u8])]) -> Vec<u8> {
        let mut spec = b"Spec ID Event03\0".to_vec();
        spec.extend_from_slice(&[0; 4]); // platform class
        spec.extend_from_slice(&[0, 2, 0, 2]); // minor, major, errata, uintn size
        spec.extend_from_slice(&2u32.to_le_bytes());
        spec.extend_from_slice(&0x0004u16.to_le_bytes());
        spec.extend_from_slice(&20u16.to_le_bytes());
        spec.extend_from_slice(&0x000Bu16.to_le_bytes());
        spec.extend_from_slice(&32u16.to_le_bytes());
        spec.push(0);
        let mut out = Vec::new();
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        out.extend_from_slice(&[0; 20]);
        out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&spec);
        for (pcr, ty, d, data) in events {
            out.extend_from_slice(&pcr.to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&2u32.to_le_bytes());
            out.extend_from_slice(&0x0004u16.to_le_bytes());
            out.extend_from_slice(&[0xAA; 20]);
            out.extend_from_slice(&0x000Bu16.to_le_bytes());
            out.extend_from_slice(d);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn replays_firmware_then_userspace_for_one_pcr() {
        let a: [u8; 32] = Sha256::digest(b".linux\0").into();
        let b: [u8; 32] = Sha256::digest(b"kernel").into();
        let bytes = log(&[
            (11, EV_IPL, a, b".linux"),
            (7, 0x80000001, [9; 32], b"x"),
            (11, EV_NO_ACTION, [8; 32], b""),
            (11, EV_IPL, b, b".linux"),
        ]);
        let events = parse_tcg2(&bytes).expect("parse");
        assert_eq!(events.len(), 4);
        let phase: [u8; 32] = Sha256::digest(b"enter-initrd").into();
        let user = parse_userspace(&format!(
            "\u{1e}{{\"pcr\":11,\"digests\":[{{\"hashAlg\":\"sha256\",\"digest\":\"{}\"}}],\"content_type\":\"systemd\",\"content\":{{\"string\":\"enter-initrd\"}}}}\n",
            hex::encode(phase)
        ))
        .expect("user");
        let r = replay(11, &events, &user).expect("replay");
        let mut want = [0u8; 32];
        crate::trust::measure::extend(&mut want, &a);
        crate::trust::measure::extend(&mut want, &b);
        crate::trust::measure::extend(&mut want, &phase);
        assert_eq!(r.value, want);
        assert_eq!(r.firmware_events, 2);
        assert_eq!(r.userspace_events, vec!["enter-initrd"]);
    }

    #[test]
    fn rejects_truncated_and_foreign_logs() {
        let bytes = log(&[(11, EV_IPL, [1; 32], b"abc")]);
        assert!(matches!(
            parse_tcg2(&bytes[..bytes.len() - 2]),
            Err(EventLogError::Truncated(_))
        ));
        assert_eq!(
            parse_tcg2(&[0u8; 64]).err(),
            Some(EventLogError::NotCryptoAgile)
        );
        assert!(parse_userspace("\u{1e}{not json}").is_err());
    }
}
