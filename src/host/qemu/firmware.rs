//! OVMF variable stores with the operator's Secure Boot keys enrolled, made with virt-fw-vars
//! (python3-virt-firmware) from the tools tree.

use crate::host::tools::{run, ToolsTree};
use crate::manifest::SecureBootCerts;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// Writes `out`: a copy of the OVMF vars `template` with PK, KEK and db set to the image's
/// certificates, no Microsoft keys, and Secure Boot switched on. `work` is a scratch directory.
pub fn enroll(
    tools: &ToolsTree,
    template: &Path,
    certs: &SecureBootCerts,
    work: &Path,
    out: &Path,
) -> Result<()> {
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let input = work.join("vars-template.fd");
    fs::copy(template, &input).with_context(|| format!("copying {}", template.display()))?;
    for (name, pem) in [("PK", &certs.pk), ("KEK", &certs.kek), ("db", &certs.db)] {
        fs::write(work.join(format!("{name}.crt")), pem)
            .with_context(|| format!("writing {name}.crt"))?;
    }
    let staged = work.join("vars-enrolled.fd");
    let g = &certs.owner_guid;
    run(tools
        .clone()
        .bind(work)
        .command("virt-fw-vars")?
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&staged)
        .args(["--set-pk", g])
        .arg(work.join("PK.crt"))
        .args(["--add-kek", g])
        .arg(work.join("KEK.crt"))
        .args(["--add-db", g])
        .arg(work.join("db.crt"))
        .arg("--no-microsoft")
        .arg("--secure-boot"))
    .context("enrolling the Secure Boot keys into the OVMF variables (virt-fw-vars)")?;
    fs::copy(&staged, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
