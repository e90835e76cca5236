//! Was Secure Boot on, with only the operator's key in the firmware's db? Read from the firmware
//! event log's PCR 7 events (TCG PC Client Platform Firmware Profile: `EV_EFI_VARIABLE_DRIVER_CONFIG`
//! records of the SecureBoot, PK, KEK, db and dbx variables as `UEFI_VARIABLE_DATA`), after the
//! log was replayed to the PCR 7 value a quote or the TPM reports.
//!
//! Why it matters: PCR 11 only says what was extended into it. A machine that can boot code the
//! operator did not sign (Secure Boot off, or a db that also trusts someone else's key) can
//! extend PCR 11 by hand to any signed state. Only with Secure Boot on and the operator's key as
//! the only one in db does a signed PCR 11 mean the signed UKI ran. Pure; callers give the
//! events and the PCR value.

use super::eventlog::Event;
use sha2::{Digest, Sha256};

pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
/// EFI_CERT_X509_GUID (a1 59 c0 a5 e4 94 a7 4a 87 b5 ab 15 5c 2b f0 72, little-endian fields).
const EFI_CERT_X509: [u8; 16] = [
    0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72,
];

/// One UEFI variable as measured: its name and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub data: Vec<u8>,
}

/// Parses a `UEFI_VARIABLE_DATA`: GUID, name length (u64, in UTF-16 units), data length (u64),
/// the name (UTF-16LE), the data. Nothing may follow.
pub fn parse_variable(b: &[u8]) -> Option<Variable> {
    let name_len = usize::try_from(u64::from_le_bytes(b.get(16..24)?.try_into().ok()?)).ok()?;
    let data_len = usize::try_from(u64::from_le_bytes(b.get(24..32)?.try_into().ok()?)).ok()?;
    let name_end = name_len.checked_mul(2)?.checked_add(32)?;
    let end = name_end.checked_add(data_len)?;
    if end != b.len() {
        return None;
    }
    let units: Vec<u16> = b[32..name_end]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Some(Variable {
        name: String::from_utf16(&units).ok()?,
        data: b[name_end..end].to_vec(),
    })
}

/// The X.509 certificates (DER) and the number of other entries in an EFI_SIGNATURE_LIST
/// sequence (the data of db).
pub fn signature_lists(mut b: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    let mut certs = Vec::new();
    let mut others = 0;
    while !b.is_empty() {
        let kind: [u8; 16] = b.get(..16)?.try_into().ok()?;
        let list_size = u32::from_le_bytes(b.get(16..20)?.try_into().ok()?) as usize;
        let header_size = u32::from_le_bytes(b.get(20..24)?.try_into().ok()?) as usize;
        let sig_size = u32::from_le_bytes(b.get(24..28)?.try_into().ok()?) as usize;
        let list = b.get(..list_size)?;
        let body = list.get(28usize.checked_add(header_size)?..)?;
        if sig_size <= 16 || body.len() % sig_size != 0 {
            return None;
        }
        for sig in body.chunks_exact(sig_size) {
            if kind == EFI_CERT_X509 {
                certs.push(sig[16..].to_vec());
            } else {
                others += 1;
            }
        }
        b = &b[list_size..];
    }
    Some((certs, others))
}

/// Checks that the firmware log replays to `pcr7`, that its Secure Boot variable records are
/// what was measured (each digest is its data's), that SecureBoot was 1, and that db held the
/// operator's certificate `db_cert_der` and nothing else.
pub fn check(firmware: &[Event], pcr7: &[u8; 32], db_cert_der: &[u8]) -> Result<(), String> {
    let replayed = super::eventlog::replay(7, firmware, &[])?;
    if replayed.value != *pcr7 {
        return Err(
            "the firmware event log does not replay to PCR 7 (Secure Boot state unexplained)"
                .into(),
        );
    }
    let mut secure_boot = None;
    let mut db = None;
    for e in firmware
        .iter()
        .filter(|e| e.pcr == 7 && e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
    {
        let digest: [u8; 32] = Sha256::digest(&e.data).into();
        if e.sha256 != Some(digest) {
            return Err(
                "a Secure Boot variable record in the firmware log is not what was measured".into(),
            );
        }
        let v = parse_variable(&e.data)
            .ok_or("a Secure Boot variable record in the firmware log does not parse")?;
        match v.name.as_str() {
            "SecureBoot" => secure_boot = Some(v.data),
            "db" => db = Some(v.data),
            _ => {}
        }
    }
    match secure_boot.as_deref() {
        Some([1]) => {}
        Some(_) => return Err("Secure Boot was off during this boot".into()),
        None => return Err("the firmware log records no Secure Boot state".into()),
    }
    let db = db.ok_or("the firmware log records no db variable")?;
    let (certs, others) =
        signature_lists(&db).ok_or("the db variable in the firmware log does not parse")?;
    if certs.is_empty() || certs.iter().any(|c| c.as_slice() != db_cert_der) || others > 0 {
        return Err(format!(
            "the firmware's db trusts other keys than the operator's db certificate ({} certificate(s), {} other entries): code someone else signed could boot and forge PCR 11",
            certs.len(),
            others
        ));
    }
    Ok(())
}

/// Test and fixture helpers: the records a firmware with Secure Boot `on` and `db_der` in db
/// measures, as (event data) in measurement order.
pub fn variable_data(name: &str, data: &[u8]) -> Vec<u8> {
    let units: Vec<u16> = name.encode_utf16().collect();
    let mut b = vec![0u8; 16];
    b.extend_from_slice(&(units.len() as u64).to_le_bytes());
    b.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for u in units {
        b.extend_from_slice(&u.to_le_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// An EFI_SIGNATURE_LIST holding one X.509 certificate.
pub fn x509_signature_list(der: &[u8]) -> Vec<u8> {
    let sig_size = 16 + der.len();
    let mut b = EFI_CERT_X509.to_vec();
    b.extend_from_slice(&((28 + sig_size) as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(sig_size as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(der);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: Vec<u8>) -> Event {
        Event {
            pcr: 7,
            event_type: EV_EFI_VARIABLE_DRIVER_CONFIG,
            sha256: Some(Sha256::digest(&data).into()),
            data,
        }
    }

    fn pcr7(events: &[Event]) -> [u8; 32] {
        super::super::eventlog::replay(7, events, &[])
            .expect("replay")
            .value
    }

    #[test]
    fn secure_boot_on_with_only_the_operators_db_passes_and_every_other_state_fails() {
        let ours = b"operator db cert".to_vec();
        let theirs = b"someone else".to_vec();
        let good = vec![
            event(variable_data("SecureBoot", &[1])),
            event(variable_data("db", &x509_signature_list(&ours))),
        ];
        check(&good, &pcr7(&good), &ours).expect("secure boot on, our db");

        let off = vec![
            event(variable_data("SecureBoot", &[0])),
            event(variable_data("db", &x509_signature_list(&ours))),
        ];
        assert!(check(&off, &pcr7(&off), &ours).unwrap_err().contains("off"));

        let mut two = x509_signature_list(&ours);
        two.extend(x509_signature_list(&theirs));
        let shared = vec![
            event(variable_data("SecureBoot", &[1])),
            event(variable_data("db", &two)),
        ];
        assert!(check(&shared, &pcr7(&shared), &ours)
            .unwrap_err()
            .contains("other keys"));

        // A log whose record says "on" but whose digest is of "off".
        let mut lying = good.clone();
        lying[0].sha256 = Some(Sha256::digest(variable_data("SecureBoot", &[0])).into());
        assert!(check(&lying, &pcr7(&lying), &ours)
            .unwrap_err()
            .contains("not what was measured"));
        // A log that does not explain the quoted PCR 7.
        assert!(check(&good, &[0u8; 32], &ours)
            .unwrap_err()
            .contains("does not replay"));
        assert!(check(&[], &pcr7(&[]), &ours).is_err());
    }

    #[test]
    fn variable_records_parse_strictly() {
        let v = variable_data("db", b"xyz");
        assert_eq!(
            parse_variable(&v),
            Some(Variable {
                name: "db".into(),
                data: b"xyz".to_vec()
            })
        );
        let mut longer = v.clone();
        longer.push(0);
        assert_eq!(parse_variable(&longer), None);
        assert_eq!(parse_variable(&v[..20]), None);
        let mut huge = v.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse_variable(&huge), None);
        assert_eq!(signature_lists(&[1, 2, 3]), None);
    }
}
