//! The spool: `keel-agent serve` (the keel-agent service) watches /var/lib/keel/spool for
//! oci-archives (`NAME.tar`) and runs each as container NAME. Writers put a file in place with a
//! rename (write `NAME.tar.part`, then rename it to `NAME.tar`), so a half-written archive is
//! never picked up.
//!
//! Each archive ends in one of three directories, beside a `NAME.reason` file saying why (the
//! journal says it too):
//! - `done/`: the container started;
//! - `refused/`: the policy said no (unsigned, tampered, unenrolled machine, untrusted boot);
//!   trying again would change nothing;
//! - `failed/`: starting it failed [`RetryPolicy::max_attempts`] times for reasons of this
//!   machine (disk full, crun or systemd failed). A failed attempt leaves the archive in the
//!   spool and retries it after a delay that doubles each time. The count lives in the agent's
//!   memory: a restarted agent starts counting again.

use super::containers::{self, Machine, Refusal, RunOptions};
use super::network;
use super::systemd::Units;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Archives waiting in the spool, oldest name first.
pub fn pending(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(spool)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                // Regular files only: a link in the spool is never followed.
                .filter(|p| {
                    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
                        && p.extension().is_some_and(|x| x == "tar")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// How failed starts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after the first failure; it doubles after each further one.
    pub first_delay: Duration,
    /// Attempts in all; after the last one fails the archive moves to `failed/`.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// Five attempts over about 2.5 minutes (10, 20, 40, 80 s apart).
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_secs(10),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed + 1`, after `failed` failures.
    pub fn delay(&self, failed: u32) -> Duration {
        self.first_delay
            .saturating_mul(1u32 << failed.saturating_sub(1).min(16))
    }
}

/// Where one archive went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Started; the archive is in `done/`.
    Done(PathBuf),
    /// The policy said no; the archive is in `refused/`.
    Refused(PathBuf),
    /// The last allowed attempt failed; the archive is in `failed/`.
    Failed(PathBuf),
    /// This attempt failed; the archive stays in the spool until `after` has passed.
    Retry { attempt: u32, after: Duration },
}

#[derive(Debug, Clone, Copy)]
struct Attempts {
    failed: u32,
    next: Instant,
    /// Which file failed: an archive replaced under the same name starts with no failures.
    identity: Option<Identity>,
}

/// A file's inode, size and modification time.
type Identity = (u64, u64, i64, i64);

fn identity(p: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The spool and what the agent remembers between its looks at it.
#[derive(Debug)]
pub struct Spool {
    pub dir: PathBuf,
    pub retry: RetryPolicy,
    /// The previous look found the node's container network missing (said once per change).
    waiting: bool,
    attempts: BTreeMap<PathBuf, Attempts>,
}

impl Spool {
    pub fn new(dir: PathBuf, retry: RetryPolicy) -> Spool {
        Spool {
            dir,
            retry,
            waiting: false,
            attempts: BTreeMap::new(),
        }
    }

    /// One look at the spool at time `now`: runs what waits there and is due, unless the node's
    /// container network is not ready yet (then the archives stay, and are run once it is).
    /// Returns whether it is waiting for the network, and what happened to each archive it
    /// tried.
    pub fn pass(
        &mut self,
        root: &Path,
        machine: &dyn Machine,
        units: &dyn Units,
        net: &dyn network::Host,
        now: Instant,
    ) -> (bool, Vec<Disposition>) {
        let archives = pending(&self.dir);
        // Forget archives that left the spool, and those replaced by a new file of the same name.
        self.attempts
            .retain(|a, t| archives.contains(a) && t.identity == identity(a));
        if archives.is_empty() {
            return (self.waiting, vec![]);
        }
        if let Some(marker) = network::network_pending(root) {
            if !self.waiting {
                tracing::warn!(
                    marker = %marker.display(),
                    archives = archives.len(),
                    "the node joins a keel-net overlay but has no CNI network config yet (no subnet lease): the spool waits"
                );
            }
            self.waiting = true;
            return (true, vec![]);
        }
        if self.waiting {
            tracing::info!("the node's CNI network config is there: running the spool");
        }
        self.waiting = false;
        let mut out = Vec::new();
        for a in archives {
            if self.attempts.get(&a).is_some_and(|t| now < t.next) {
                continue;
            }
            out.push(self.process(root, &a, machine, units, net, now));
        }
        (false, out)
    }

    /// Runs one archive and files it according to the outcome.
    fn process(
        &mut self,
        root: &Path,
        archive: &Path,
        machine: &dyn Machine,
        units: &dyn Units,
        net: &dyn network::Host,
        now: Instant,
    ) -> Disposition {
        let name = containers::default_name(archive);
        let before = identity(archive);
        let result = containers::run(
            root,
            archive,
            &name,
            machine,
            units,
            net,
            &RunOptions::default(),
        );
        match result {
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
                self.attempts.remove(archive);
                Disposition::Done(file(&self.dir, archive, "done", &name, None))
            }
            Err(e) if Refusal::is_refusal(&e) => {
                tracing::error!(container = %name, archive = %archive.display(), "{e:#}");
                self.attempts.remove(archive);
                let reason = format!("{e:#}\n");
                Disposition::Refused(file(&self.dir, archive, "refused", &name, Some(&reason)))
            }
            Err(e) => {
                let failed = self.attempts.get(archive).map_or(0, |a| a.failed) + 1;
                if failed >= self.retry.max_attempts {
                    tracing::error!(
                        container = %name,
                        archive = %archive.display(),
                        attempt = failed,
                        "failed to start, giving up after {failed} attempts: {e:#}"
                    );
                    self.attempts.remove(archive);
                    let reason = format!("failed {failed} times; the last time: {e:#}\n");
                    return Disposition::Failed(file(
                        &self.dir,
                        archive,
                        "failed",
                        &name,
                        Some(&reason),
                    ));
                }
                let after = self.retry.delay(failed);
                tracing::warn!(
                    container = %name,
                    archive = %archive.display(),
                    attempt = failed,
                    "failed to start (attempt {failed} of {}), retrying in {}s: {e:#}",
                    self.retry.max_attempts,
                    after.as_secs()
                );
                self.attempts.insert(
                    archive.to_path_buf(),
                    Attempts {
                        failed,
                        next: now + after,
                        identity: before,
                    },
                );
                Disposition::Retry {
                    attempt: failed,
                    after,
                }
            }
        }
    }
}

/// Moves `archive` into the spool's subdirectory `sub`, with `NAME.reason` beside it when there
/// is a reason; returns the new path.
fn file(spool: &Path, archive: &Path, sub: &str, name: &str, reason: Option<&str>) -> PathBuf {
    let dir = spool.join(sub);
    if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        // A link (or file) where the subdirectory belongs: nothing is written through it.
        tracing::error!(dir = %dir.display(), "not a directory; removing the archive instead of filing it");
        let _ = fs::remove_file(archive);
        return dir;
    }
    let _ = fs::create_dir(&dir);
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
        let path = dir.join(format!("{name}.reason"));
        if let Err(e) = crate::atomic::write(&path, r.as_bytes(), 0o644) {
            tracing::error!("{}", crate::error::chain(&e));
        }
    }
    dest
}

/// The spool must be a real directory owned by root that no one else may write: whoever writes
/// it chooses what the agent files and where.
pub fn check_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(dir)
        .map_err(|e| anyhow::anyhow!("reading the spool {}: {e}", dir.display()))?;
    if !m.is_dir() {
        anyhow::bail!(
            "the spool {} is not a directory (a link?); remove it and restart keel-agent",
            dir.display()
        );
    }
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        anyhow::bail!(
            "the spool {} is owned by uid {} with mode {:o}; it must be root's and writable by no one else (chown root: and chmod 0700 it)",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}

/// Watches the spool until the process is stopped.
pub fn serve(
    root: &Path,
    machine: &dyn Machine,
    units: &dyn Units,
    net: &dyn network::Host,
) -> anyhow::Result<()> {
    let dir = root.join(containers::SPOOL_DIR);
    fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating the spool {}: {e}", dir.display()))?;
    check_private(&dir)?;
    tracing::info!(spool = %dir.display(), "watching the spool for signed oci-archives (NAME.tar)");
    let mut spool = Spool::new(dir, RetryPolicy::default());
    loop {
        spool.pass(root, machine, units, net, Instant::now());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::oci::{self, Layout};
    use crate::node::agent::testkit::{node, node_signed_for, FakeMachine, FakeUnits, NoNet};

    const MACHINE: FakeMachine = FakeMachine {
        ek: None,
        trusted: true,
    };

    /// A node root with the signed image as `web.tar` in its spool.
    fn spool_with_signed_archive() -> (tempfile::TempDir, Spool) {
        let (t, _, img) = node_signed_for(false, "keel/web");
        let dir = t.path().join(containers::SPOOL_DIR);
        fs::create_dir_all(&dir).expect("spool");
        let layout = Layout::open(&img).expect("layout");
        oci::write_archive(&layout, &dir.join("web.tar")).expect("archive");
        let spool = Spool::new(
            dir,
            RetryPolicy {
                first_delay: Duration::from_secs(10),
                max_attempts: 3,
            },
        );
        (t, spool)
    }

    #[test]
    fn the_delay_doubles() {
        let r = RetryPolicy::default();
        let delays: Vec<u64> = (1..=4).map(|n| r.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![10, 20, 40, 80]);
        assert!(r.delay(u32::MAX) > r.delay(4), "no overflow");
    }

    #[test]
    fn an_unsigned_archive_is_refused_at_once_and_never_retried() {
        let (t, _, img) = node(false);
        let dir = t.path().join(containers::SPOOL_DIR);
        fs::create_dir_all(&dir).expect("spool");
        let unsigned = t.path().join("unsigned");
        crate::container::build::from_tree(
            &img.join("..").join("tree"),
            &unsigned,
            &["/bin/hello".into()],
            &[],
        )
        .expect("build");
        oci::write_archive(
            &Layout::open(&unsigned).expect("layout"),
            &dir.join("bad.tar"),
        )
        .expect("archive");
        let units = FakeUnits::default();
        let mut spool = Spool::new(dir.clone(), RetryPolicy::default());
        let (_, out) = spool.pass(t.path(), &MACHINE, &units, &NoNet, Instant::now());
        assert_eq!(out, vec![Disposition::Refused(dir.join("refused/bad.tar"))]);
        let reason = fs::read_to_string(dir.join("refused/bad.reason")).expect("reason");
        assert!(reason.contains("not signed"), "{reason}");
        assert!(!dir.join("failed").exists(), "a refusal is not a failure");
        assert_eq!(units.attempts.get(), 0, "nothing was started");
    }

    #[test]
    fn a_failed_start_is_retried_with_backoff_then_filed_as_failed() {
        let (t, mut spool) = spool_with_signed_archive();
        let units = FakeUnits::default();
        units.fail.set(true);
        let t0 = Instant::now();
        let (_, out) = spool.pass(t.path(), &MACHINE, &units, &NoNet, t0);
        assert_eq!(
            out,
            vec![Disposition::Retry {
                attempt: 1,
                after: Duration::from_secs(10)
            }]
        );
        assert!(spool.dir.join("web.tar").is_file(), "kept in the spool");
        assert!(
            !spool.dir.join("refused").exists(),
            "a failure is not a refusal"
        );

        // Not due yet: not tried again.
        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t0 + Duration::from_secs(9),
        );
        assert!(out.is_empty());
        assert_eq!(units.attempts.get(), 1);

        let t1 = t0 + Duration::from_secs(10);
        let (_, out) = spool.pass(t.path(), &MACHINE, &units, &NoNet, t1);
        assert_eq!(
            out,
            vec![Disposition::Retry {
                attempt: 2,
                after: Duration::from_secs(20)
            }]
        );
        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t1 + Duration::from_secs(19),
        );
        assert!(out.is_empty(), "the delay doubled");

        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t1 + Duration::from_secs(20),
        );
        assert_eq!(
            out,
            vec![Disposition::Failed(spool.dir.join("failed/web.tar"))]
        );
        assert_eq!(units.attempts.get(), 3);
        let reason = fs::read_to_string(spool.dir.join("failed/web.reason")).expect("reason");
        assert!(
            reason.contains("failed 3 times") && reason.contains("job failed"),
            "{reason}"
        );
        assert!(!spool.dir.join("web.tar").exists());
        assert!(!spool.dir.join("refused").exists());
    }

    #[test]
    fn a_start_that_fails_once_succeeds_on_its_retry() {
        let (t, mut spool) = spool_with_signed_archive();
        let units = FakeUnits::default();
        units.fail.set(true);
        let t0 = Instant::now();
        spool.pass(t.path(), &MACHINE, &units, &NoNet, t0);
        units.fail.set(false);
        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(out, vec![Disposition::Done(spool.dir.join("done/web.tar"))]);
        assert_eq!(units.started.borrow().len(), 1);
    }

    #[test]
    fn a_replaced_archive_starts_with_no_failures() {
        let (t, mut spool) = spool_with_signed_archive();
        let units = FakeUnits::default();
        units.fail.set(true);
        let t0 = Instant::now();
        spool.pass(t.path(), &MACHINE, &units, &NoNet, t0);
        spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(units.attempts.get(), 2);
        // A new version dropped in under the same name (write, then rename over the old one).
        let tar = spool.dir.join("web.tar");
        let part = spool.dir.join("web.tar.part");
        fs::copy(&tar, &part).expect("copy");
        fs::rename(&part, &tar).expect("rename");
        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &units,
            &NoNet,
            t0 + Duration::from_secs(11),
        );
        assert_eq!(
            out,
            vec![Disposition::Retry {
                attempt: 1,
                after: Duration::from_secs(10)
            }],
            "tried at once, counted from one"
        );
    }

    /// Review L9: a link in the spool is not run, a link where `refused/` belongs is not
    /// written through, and a spool others may write is refused at start.
    #[test]
    fn links_in_the_spool_are_never_followed() {
        let (t, mut spool) = spool_with_signed_archive();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        // The signed archive moves out; a link to it is all the spool holds.
        let real = t.path().join("web.tar");
        fs::rename(spool.dir.join("web.tar"), &real).expect("mv");
        std::os::unix::fs::symlink(&real, spool.dir.join("web.tar")).expect("link");
        assert!(pending(&spool.dir).is_empty());
        fs::remove_file(spool.dir.join("web.tar")).expect("rm");
        // A regular archive, refused (unsigned here: bytes that are no archive), with refused/
        // a link to a directory outside the spool.
        fs::write(spool.dir.join("bad.tar"), b"not an archive").expect("write");
        std::os::unix::fs::symlink(&outside, spool.dir.join("refused")).expect("link");
        let (_, out) = spool.pass(
            t.path(),
            &MACHINE,
            &FakeUnits::default(),
            &NoNet,
            Instant::now(),
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            fs::read_dir(&outside).expect("list").count(),
            0,
            "written through the link"
        );
        // The spool's own mode and owner.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&spool.dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_private(&spool.dir).expect_err("world-writable");
        assert!(e.to_string().contains("writable by no one else"), "{e}");
        fs::set_permissions(&spool.dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        if nix::unistd::geteuid().is_root() {
            check_private(&spool.dir).expect("root's, 0700");
        }
    }
}
