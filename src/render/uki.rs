//! The unified kernel image: kernel, initrd, os-release and the command line that carries the
//! /usr root hash, built by ukify from the tools tree (so systemd-stub matches systemd 257).

use crate::tools::{run, ToolsTree};
use anyhow::{Context, Result};
use std::path::Path;

/// The kernel command line of an image: the /usr root hash first, then what every keel image
/// needs (a writable root; no interactive first-boot wizard, since nodes are configured by
/// provisioning), then the definition's extras.
pub fn cmdline(root_hash: &str, extra: &[String]) -> String {
    let mut parts = vec![
        format!("usrhash={root_hash}"),
        "rw".to_string(),
        "systemd.firstboot=off".to_string(),
    ];
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

pub fn build(tools: &ToolsTree, input: &UkiInput, out: &Path) -> Result<()> {
    run(tools
        .command("ukify")?
        .arg("build")
        .arg(format!("--linux={}", input.kernel.display()))
        .arg(format!("--initrd={}", input.initrd.display()))
        .arg(format!("--os-release=@{}", input.os_release.display()))
        .arg(format!("--uname={}", input.kernel_version))
        .arg(format!("--cmdline={}", input.cmdline))
        .arg(format!("--output={}", out.display())))
    .context("building the UKI with ukify")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_starts_with_usrhash() {
        assert_eq!(
            cmdline("ab", &["console=ttyS0".into()]),
            "usrhash=ab rw systemd.firstboot=off console=ttyS0"
        );
    }
}
