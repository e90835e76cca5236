//! The TPM seam: everything keel-agent asks the TPM goes through here (tss-esapi over the
//! kernel's resource manager, /dev/tpmrm0). The TCTI variables of the environment
//! (TPM2TOOLS_TCTI, TCTI, TEST_TCTI) are never read: the gate's answers (EK, PCRs) must come from
//! the machine's TPM, not from whatever TPM the caller's environment names.

use anyhow::{Context, Result};
use std::str::FromStr;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectionListBuilder, PcrSlot};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};

/// The machine's TPM.
pub const DEVICE: &str = "/dev/tpmrm0";

fn tcti() -> Result<TctiNameConf> {
    Ok(TctiNameConf::Device(
        DeviceConfig::from_str(DEVICE).context("TPM device configuration")?,
    ))
}

fn context() -> Result<tss_esapi::Context> {
    tss_esapi::Context::new(tcti()?).context("opening the TPM (/dev/tpmrm0): is there a TPM 2.0?")
}

fn slot(index: u32) -> Result<PcrSlot> {
    Ok(match index {
        0 => PcrSlot::Slot0,
        1 => PcrSlot::Slot1,
        2 => PcrSlot::Slot2,
        3 => PcrSlot::Slot3,
        4 => PcrSlot::Slot4,
        5 => PcrSlot::Slot5,
        6 => PcrSlot::Slot6,
        7 => PcrSlot::Slot7,
        8 => PcrSlot::Slot8,
        9 => PcrSlot::Slot9,
        10 => PcrSlot::Slot10,
        11 => PcrSlot::Slot11,
        12 => PcrSlot::Slot12,
        13 => PcrSlot::Slot13,
        14 => PcrSlot::Slot14,
        15 => PcrSlot::Slot15,
        _ => anyhow::bail!("PCR {index} is not one keel-agent reads (0-15)"),
    })
}

/// Reads PCRs of the sha256 bank (at most 8 per TPM2_PCR_Read), in the order given.
pub fn read_pcrs_sha256(indices: &[u32]) -> Result<Vec<(u32, [u8; 32])>> {
    let mut ctx = context()?;
    let mut out = Vec::new();
    for chunk in indices.chunks(8) {
        let slots = chunk.iter().map(|i| slot(*i)).collect::<Result<Vec<_>>>()?;
        let sel = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .context("building the PCR selection")?;
        let (_, _, digests) = ctx
            .pcr_read(sel)
            .with_context(|| format!("reading PCRs {chunk:?} (sha256)"))?;
        // The TPM answers in ascending PCR order.
        let mut sorted = chunk.to_vec();
        sorted.sort_unstable();
        if digests.value().len() != sorted.len() {
            anyhow::bail!(
                "the TPM returned {} of {} PCR values (sha256 bank off?)",
                digests.value().len(),
                sorted.len()
            );
        }
        for (i, d) in sorted.iter().zip(digests.value()) {
            let v = <[u8; 32]>::try_from(d.value())
                .with_context(|| format!("PCR {i} sha256 value has {} bytes", d.value().len()))?;
            out.push((*i, v));
        }
    }
    out.sort_by_key(|(i, _)| indices.iter().position(|x| x == i));
    Ok(out)
}

/// `sha256:<hex>` of this TPM's endorsement key: the RSA 2048 EK of the TCG default template
/// (created from the endorsement seed, so the same key every time), as DER SubjectPublicKeyInfo.
pub fn ek_sha256() -> Result<String> {
    use tss_esapi::abstraction::ek;
    use tss_esapi::interface_types::algorithm::AsymmetricAlgorithm;
    use tss_esapi::structures::Public;
    let mut ctx = context()?;
    let handle = ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Rsa, None)
        .context("creating the endorsement key (TCG default RSA 2048 template)")?;
    let read = ctx.read_public(handle);
    let _ = ctx.flush_context(handle.into());
    let (public, _, _) = read.context("reading the endorsement key's public part")?;
    let Public::Rsa {
        unique, parameters, ..
    } = public
    else {
        anyhow::bail!("the endorsement key is not an RSA key");
    };
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    spki_sha256(unique.value(), exponent)
}

/// sha256 of the DER SubjectPublicKeyInfo of an RSA public key.
pub fn spki_sha256(modulus: &[u8], exponent: u32) -> Result<String> {
    use openssl::bn::BigNum;
    let n = BigNum::from_slice(modulus).context("EK modulus")?;
    let e = BigNum::from_u32(exponent).context("EK exponent")?;
    let rsa = openssl::rsa::Rsa::from_public_components(n, e).context("EK public key")?;
    let der = openssl::pkey::PKey::from_rsa(rsa)
        .and_then(|k| k.public_key_to_der())
        .context("encoding the EK public key")?;
    Ok(format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der))
    ))
}

#[cfg(test)]
mod tests {
    /// Review L6: a caller's environment naming another TPM (a software TPM with the PCRs and
    /// EK of its choice) does not change which TPM keel-agent asks.
    #[test]
    fn the_environment_does_not_choose_the_tpm() {
        for var in ["TPM2TOOLS_TCTI", "TCTI", "TEST_TCTI"] {
            std::env::set_var(var, "swtpm:host=127.0.0.1,port=2321");
        }
        let conf = format!("{:?}", super::tcti().expect("conf"));
        for var in ["TPM2TOOLS_TCTI", "TCTI", "TEST_TCTI"] {
            std::env::remove_var(var);
        }
        assert!(
            conf.contains("Device") && conf.contains("/dev/tpmrm0"),
            "{conf}"
        );
        assert!(!conf.contains("swtpm"), "{conf}");
    }
}
