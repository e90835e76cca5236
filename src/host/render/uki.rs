//! The unified kernel image: kernel, initrd, os-release and the command line that carries the
//! /usr root hash, built by ukify from the tools tree (so systemd-stub matches systemd 257).
//!
//! For a trusted image the UKI also carries `.pcrpkey` (the public half of the operator's initrd
//! policy key) and `.pcrsig` (the signed PolicyPCR digests of every boot phase, computed here in
//! Rust from the UKI's own sections), and is signed for Secure Boot with the operator's db key.

use crate::host::tools::{run, ToolsTree};
use crate::trust::measure::{self, PhasePrediction};
use crate::trust::Keys;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;

/// The kernel command line of an image: the /usr root hash first, then what every keel image
/// needs (a writable root; no interactive first-boot wizard, since nodes are configured by
/// provisioning), the sealed root device for trusted images, then the definition's extras.
pub fn cmdline(root_hash: &str, sealed: bool, extra: &[String]) -> String {
    let mut parts = vec![format!("usrhash={root_hash}")];
    if sealed {
        parts.push("root=/dev/mapper/root".to_string());
    }
    parts.push("rw".to_string());
    parts.push("systemd.firstboot=off".to_string());
    parts.extend(extra.iter().cloned());
    parts.join(" ")
}

pub struct UkiInput<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub os_release: &'a Path,
    pub kernel_version: &'a str,
    pub cmdline: &'a str,
}

/// Phases whose policy the initrd key signs: only the initrd, so the TPM releases the root
/// volume's key nowhere else.
pub const INITRD_KEY_PHASES: &[&str] = &["enter-initrd"];
/// Phases the boot key signs: the running system's states, for boot-state checks. Only states
/// after the root was opened through the TPM (`keel-root-opened` without `keel-recovery`
/// before it); the boot key can release nothing.
pub const BOOT_KEY_PHASES: &[&str] = &[
    "enter-initrd:keel-root-opened:leave-initrd",
    "enter-initrd:keel-root-opened:leave-initrd:sysinit",
    "enter-initrd:keel-root-opened:leave-initrd:sysinit:ready",
];

fn ukify(tools: &ToolsTree, input: &UkiInput, out: &Path) -> Result<std::process::Command> {
    let mut cmd = tools.command("ukify")?;
    cmd.arg("build")
        .arg(format!("--linux={}", input.kernel.display()))
        .arg(format!("--initrd={}", input.initrd.display()))
        .arg(format!("--os-release=@{}", input.os_release.display()))
        .arg(format!("--uname={}", input.kernel_version))
        .arg(format!("--cmdline={}", input.cmdline))
        .arg("--no-sign-kernel")
        .arg(format!("--output={}", out.display()));
    Ok(cmd)
}

/// Builds an unsigned UKI (images without a `[trust]` table).
pub fn build(tools: &ToolsTree, input: &UkiInput, out: &Path) -> Result<()> {
    run(&mut ukify(tools, input, out)?).context("building the UKI with ukify")
}

/// Builds a measured, policy-signed and Secure Boot-signed UKI; returns the PCR 11 predictions.
pub fn build_signed(
    tools: &ToolsTree,
    input: &UkiInput,
    keys: &Keys,
    work: &Path,
    out: &Path,
) -> Result<Vec<PhasePrediction>> {
    let tools = tools.clone().bind(&keys.dir);
    let pcrpkey = work.join("pcrpkey.pem");
    fs::write(&pcrpkey, &keys.pcr_initrd_pub_pem).context("writing the .pcrpkey file")?;
    let first = work.join("uki-measure.efi");
    run(ukify(&tools, input, &first)?.arg(format!("--pcrpkey={}", pcrpkey.display())))
        .context("building the UKI with ukify")?;
    let sections = measure::measured_sections(
        &fs::read(&first).with_context(|| format!("reading {}", first.display()))?,
    )
    .context("reading the UKI's sections")?;
    let predictions = measure::predict(&sections);
    let mut entries = measure::sign_phases(&predictions, INITRD_KEY_PHASES, &keys.pcr_initrd)?;
    entries.extend(measure::sign_phases(
        &predictions,
        BOOT_KEY_PHASES,
        &keys.pcr_boot,
    )?);
    let pcrsig = work.join("pcrsig.json");
    fs::write(&pcrsig, measure::pcrsig_json(entries)?).context("writing .pcrsig")?;
    run(ukify(&tools, input, out)?
        .arg(format!("--pcrpkey={}", pcrpkey.display()))
        .arg(format!("--section=.pcrsig:@{}", pcrsig.display()))
        .arg("--signtool=sbsign")
        .arg(format!(
            "--secureboot-private-key={}",
            keys.db_key.display()
        ))
        .arg(format!(
            "--secureboot-certificate={}",
            keys.db_crt.display()
        )))
    .context("building the signed UKI with ukify")?;
    // Adding .pcrsig and the Authenticode signature must not change what the stub measures.
    let final_sections = measure::measured_sections(
        &fs::read(out).with_context(|| format!("reading {}", out.display()))?,
    )?;
    if final_sections != sections {
        bail!(
            "the signed UKI's measured sections differ from the ones its .pcrsig was computed for"
        );
    }
    let _ = fs::remove_file(&first);
    Ok(predictions)
}

/// Signs an EFI binary (systemd-boot) with the db key for Secure Boot.
pub fn sbsign(tools: &ToolsTree, keys: &Keys, input: &Path, out: &Path) -> Result<()> {
    run(tools
        .clone()
        .bind(&keys.dir)
        .command("sbsign")?
        .arg("--key")
        .arg(&keys.db_key)
        .arg("--cert")
        .arg(&keys.db_crt)
        .arg("--output")
        .arg(out)
        .arg(input))
    .with_context(|| format!("signing {} with sbsign", input.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_starts_with_usrhash() {
        assert_eq!(
            cmdline("ab", false, &["console=ttyS0".into()]),
            "usrhash=ab rw systemd.firstboot=off console=ttyS0"
        );
        assert_eq!(
            cmdline("ab", true, &[]),
            "usrhash=ab root=/dev/mapper/root rw systemd.firstboot=off"
        );
    }

    #[test]
    fn initrd_key_signs_only_the_initrd_phase() {
        assert_eq!(INITRD_KEY_PHASES, &["enter-initrd"]);
        let all: Vec<&str> = INITRD_KEY_PHASES
            .iter()
            .chain(BOOT_KEY_PHASES)
            .copied()
            .collect();
        let signed: Vec<&str> = measure::PHASES
            .iter()
            .copied()
            .filter(|p| *p != "enter-initrd:keel-root-opened")
            .collect();
        assert_eq!(all, signed);
        assert!(BOOT_KEY_PHASES
            .iter()
            .all(|p| p.starts_with("enter-initrd:keel-root-opened:")));
    }
}
