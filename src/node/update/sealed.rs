//! Which PCR policy key this node's root is sealed to: read from the root volume's LUKS2
//! header (systemd-cryptenroll's `systemd-tpm2` token keeps the public key the policy was
//! signed with), so an update whose UKI is signed with another key is refused before it is
//! installed — it would boot to a recovery prompt instead of unlocking.

use base64::Engine;
use openssl::pkey::{PKey, Public};

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// The JSON metadata of a LUKS2 header (the first `hdr_size` bytes of the volume).
pub fn luks2_json(header: &[u8]) -> Option<serde_json::Value> {
    if header.len() < 4096 || &header[..6] != MAGIC || header[6..8] != [0, 2] {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[8..16]);
    let hdr_size = usize::try_from(u64::from_be_bytes(size)).ok()?;
    let area = header.get(4096..hdr_size.min(header.len()))?;
    let end = area.iter().position(|b| *b == 0).unwrap_or(area.len());
    serde_json::from_slice(&area[..end]).ok()
}

/// The public keys of the volume's `systemd-tpm2` tokens.
pub fn sealed_keys(header: &[u8]) -> Vec<PKey<Public>> {
    let Some(json) = luks2_json(header) else {
        return Vec::new();
    };
    let Some(tokens) = json.get("tokens").and_then(|t| t.as_object()) else {
        return Vec::new();
    };
    tokens
        .values()
        .filter(|t| t.get("type").and_then(|v| v.as_str()) == Some("systemd-tpm2"))
        .filter_map(|t| t.get("tpm2_pubkey")?.as_str())
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .filter_map(|raw| {
            crate::trust::keys::public_from_pem(&raw)
                .or_else(|_| PKey::public_key_from_der(&raw))
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        let mut h = vec![0u8; 16384];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&[0, 2]);
        h[8..16].copy_from_slice(&16384u64.to_be_bytes());
        h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        h
    }

    #[test]
    fn the_tpm2_tokens_key_is_read() {
        let key = openssl::rsa::Rsa::generate(2048).expect("rsa");
        let pem = key.public_key_to_pem().expect("pem");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&pem);
        let json = format!(
            r#"{{"keyslots":{{}},"tokens":{{"0":{{"type":"systemd-tpm2","keyslots":["0"],"tpm2_pubkey":"{b64}"}},"1":{{"type":"systemd-recovery"}}}}}}"#
        );
        let keys = sealed_keys(&header(&json));
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys[0].public_key_to_pem().expect("pem"),
            PKey::from_rsa(key)
                .expect("pkey")
                .public_key_to_pem()
                .expect("pem")
        );
        assert!(sealed_keys(&header(r#"{"tokens":{}}"#)).is_empty());
        assert!(sealed_keys(&[0u8; 8192]).is_empty());
    }
}
