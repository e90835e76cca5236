//! The spool: `keel-agent serve` (the keel-agent service) watches /var/lib/keel/spool for
//! oci-archives (`NAME.tar`) and runs each as container NAME. Writers put a file in place with a
//! rename (write `NAME.tar.part`, then rename it to `NAME.tar`), so a half-written archive is
//! never picked up. A processed archive moves to `done/`; a refused one to `refused/`, beside a
//! `NAME.reason` file saying why (the journal says it too).

use super::containers::{self, Machine, RunOptions};
use super::network;
use super::systemd::Units;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Archives waiting in the spool, oldest name first.
pub fn pending(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(spool)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "tar"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes one archive; returns where it was moved.
pub fn process(
    root: &Path,
    spool: &Path,
    archive: &Path,
    machine: &dyn Machine,
    units: &dyn Units,
    net: &dyn network::Host,
) -> PathBuf {
    let name = containers::default_name(archive);
    let result = containers::run(
        root,
        archive,
        &name,
        machine,
        units,
        net,
        &RunOptions::default(),
    );
    let (sub, reason) = match &result {
        Ok(s) => {
            tracing::info!(
                container = %s.name,
                unit = %s.unit,
                digest = %s.manifest_digest,
                signed_by = %s.signed_by,
                gate = %s.gate,
                addresses = %s.addresses.join(" "),
                "started container from the spool"
            );
            ("done", None)
        }
        Err(e) => {
            tracing::error!(container = %name, archive = %archive.display(), "refused: {e:#}");
            ("refused", Some(format!("{e:#}\n")))
        }
    };
    let dir = spool.join(sub);
    let _ = fs::create_dir_all(&dir);
    let file_name = archive
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let dest = dir.join(&file_name);
    if let Err(e) = fs::rename(archive, &dest) {
        tracing::error!(archive = %archive.display(), "cannot move out of the spool: {e}; removing it");
        let _ = fs::remove_file(archive);
    }
    if let Some(r) = reason {
        let _ = fs::write(dir.join(format!("{name}.reason")), r);
    }
    dest
}

/// Watches the spool until the process is stopped.
pub fn serve(
    root: &Path,
    machine: &dyn Machine,
    units: &dyn Units,
    net: &dyn network::Host,
) -> anyhow::Result<()> {
    let spool = root.join(containers::SPOOL_DIR);
    fs::create_dir_all(&spool)
        .map_err(|e| anyhow::anyhow!("creating the spool {}: {e}", spool.display()))?;
    tracing::info!(spool = %spool.display(), "watching the spool for signed oci-archives (NAME.tar)");
    loop {
        for a in pending(&spool) {
            process(root, &spool, &a, machine, units, net);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
