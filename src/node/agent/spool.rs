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
    let mut waiting = false;
    loop {
        waiting = pass(root, &spool, machine, units, net, waiting);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One look at the spool: runs what waits there, unless the node's container network is not
/// ready yet (then the archives stay, and are run once it is). `waiting` is what the previous
/// pass returned, so that the journal says it once per change, not twice a second.
pub fn pass(
    root: &Path,
    spool: &Path,
    machine: &dyn Machine,
    units: &dyn Units,
    net: &dyn network::Host,
    waiting: bool,
) -> bool {
    let archives = pending(spool);
    if archives.is_empty() {
        return waiting;
    }
    if let Some(marker) = network::network_pending(root) {
        if !waiting {
            tracing::warn!(
                marker = %marker.display(),
                archives = archives.len(),
                "the node joins a keel-net overlay but has no CNI network config yet (no subnet lease): the spool waits"
            );
        }
        return true;
    }
    if waiting {
        tracing::info!("the node's CNI network config is there: running the spool");
    }
    for a in archives {
        process(root, spool, &a, machine, units, net);
    }
    false
}
