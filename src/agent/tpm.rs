//! The TPM seam: everything keel-agent asks the TPM goes through here (tss-esapi over
//! /dev/tpmrm0, or the TCTI named by TPM2TOOLS_TCTI/TCTI).

use anyhow::{Context, Result};
use std::str::FromStr;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectionListBuilder, PcrSlot};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};

fn context() -> Result<tss_esapi::Context> {
    let tcti = match TctiNameConf::from_environment_variable() {
        Ok(t) => t,
        Err(_) => TctiNameConf::Device(
            DeviceConfig::from_str("/dev/tpmrm0").context("TPM device configuration")?,
        ),
    };
    tss_esapi::Context::new(tcti).context("opening the TPM (/dev/tpmrm0): is there a TPM 2.0?")
}

/// Reads PCR `index` of the sha256 bank.
pub fn read_pcr_sha256(index: u32) -> Result<[u8; 32]> {
    let slot = match index {
        0 => PcrSlot::Slot0,
        4 => PcrSlot::Slot4,
        7 => PcrSlot::Slot7,
        11 => PcrSlot::Slot11,
        15 => PcrSlot::Slot15,
        _ => anyhow::bail!("PCR {index} is not one keel-agent reads"),
    };
    let mut ctx = context()?;
    let sel = PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &[slot])
        .build()
        .context("building the PCR selection")?;
    let (_, _, digests) = ctx
        .pcr_read(sel)
        .with_context(|| format!("reading PCR {index} (sha256)"))?;
    let d = digests
        .value()
        .first()
        .with_context(|| format!("the TPM returned no value for PCR {index} (sha256 bank off?)"))?;
    <[u8; 32]>::try_from(d.value())
        .with_context(|| format!("PCR {index} sha256 value has {} bytes", d.value().len()))
}
