//! Applying a checked plan to a node's root file system, all or nothing.
//!
//! 1. **Prepare** (writes only inside a staging directory on the same file system): new
//!    /etc/passwd, /etc/group and /etc/shadow, every file, link, unit, drop-in, preset and SSH key
//!    file, each complete with mode and owner; conflicts (`overwrite: false` on an existing
//!    path) and unknown owners fail here, before anything outside staging changed.
//! 2. **Record** the list of moves in `staging/plan.json`.
//! 3. **Commit**: create missing directories, move each existing target into
//!    `staging/backup/`, rename each staged node into place.
//! 4. **Enable/disable** the units whose `enabled` the config sets (`systemctl --root preset`
//!    on them, as the staged `20-ignition.preset` says); a failure undoes the commit.
//! 5. **Stamp** `/var/lib/keel/provisioned.json` (the config's sha256), remove staging.
//!
//! If a boot stops anywhere before the stamp, the next one finds `plan.json` and undoes the
//! commit (staged nodes removed, backups renamed back, created directories removed) before
//! starting over: a failed first boot retries cleanly.

use super::config::{FileOp, Owner, Plan, UserOp};
use crate::container::unpack::{components, resolve_in_root};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const STAMP: &str = "var/lib/keel/provisioned.json";
const STAGING: &str = "var/lib/keel/.provision-staging";
/// The directory that holds the stamp and staging.
const KEEL_DIR: &str = "var/lib/keel";

/// Refuses a symbolic link at `var`, `var/lib` or `var/lib/keel` under `root`: the stamp and
/// staging are written and removed from the initrd, and a root volume's content may not point
/// them at the initrd's own files.
fn check_keel_dir(root: &Path) -> io::Result<()> {
    let mut here = root.to_path_buf();
    for c in Path::new(KEEL_DIR).components() {
        here.push(c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link; keel never follows links out of a node's root here",
                    here.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A path the roll-back journal recorded (relative to the root) resolved inside `root`: links
/// in its parents followed as if `root` were `/`, the last component never followed. `None` for
/// anything but a plain relative path (absolute, `..`, empty).
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let comps = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_os_string()),
            _ => None,
        })
        .collect::<Option<Vec<OsString>>>()?;
    let (name, parent) = comps.split_last()?;
    let dir = resolve_in_root(root, parent, false).ok()??;
    Some(dir.join(name))
}

/// `p` (under `root`) relative to it, for the journal.
fn relative(root: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(root).unwrap_or(p).to_path_buf()
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    #[error("{context}")]
    Io { context: String, source: io::Error },
}

fn field(f: &str, reason: impl Into<String>) -> ApplyError {
    ApplyError::Field {
        field: f.into(),
        reason: reason.into(),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let context = context.into();
    move |source| ApplyError::Io { context, source }
}

/// What the stamp records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stamp {
    pub sha256: String,
    pub version: String,
    pub source: String,
}

/// The stamp could not be read: the node was provisioned before (or something wrote the file),
/// but what it says is unknown. Never read as "not provisioned": that would apply a config again
/// over a node that already runs.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("cannot read the provisioning stamp {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the provisioning stamp {path} is corrupt ({reason}); provisioning ran on this node before, so it is not run again: restore the file from the recovery shell (its fields are sha256, version, source) or reinstall the node")]
    Corrupt { path: PathBuf, reason: String },
}

/// Reads the stamp: `None` when provisioning has not run on this root yet (no file), the stamp
/// when it has, an error when the file exists but cannot be read or parsed.
pub fn stamp(root: &Path) -> Result<Option<Stamp>, StampError> {
    let path = root.join(STAMP);
    check_keel_dir(root).map_err(|source| StampError::Unreadable {
        path: path.clone(),
        source,
    })?;
    if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(StampError::Unreadable {
            path,
            source: io::Error::other("a symbolic link, not the stamp keel wrote"),
        });
    }
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StampError::Unreadable { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StampError::Corrupt {
            path,
            reason: e.to_string(),
        })
}

/// A node staged for the commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Move {
    /// Absolute path under the root (already resolved inside it).
    target: PathBuf,
    /// The prepared node in staging.
    staged: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    moves: Vec<Move>,
    /// Directories to create, parents first: (path, mode, uid, gid).
    dirs: Vec<(PathBuf, u32, u32, u32)>,
    /// Filled during the commit, relative to the root: directories actually created, targets
    /// moved to backup (with the backup's name in `staging/backup`), targets placed. The
    /// journal lies on the root volume and is read back from the initrd: nothing in it may name
    /// a place outside the root.
    #[serde(default)]
    created_dirs: Vec<PathBuf>,
    #[serde(default)]
    backups: Vec<(PathBuf, String)>,
    #[serde(default)]
    placed: Vec<PathBuf>,
}

/// A parsed /etc/passwd or /etc/group style file: lines of `:`-separated fields.
#[derive(Debug, Clone, Default)]
struct Table {
    lines: Vec<Vec<String>>,
}

impl Table {
    fn read(p: &Path) -> Result<Table, ApplyError> {
        let text = match fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(format!("reading {}", p.display()))(e)),
        };
        Ok(Table {
            lines: text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect(),
        })
    }
    fn find(&self, name: &str) -> Option<usize> {
        self.lines
            .iter()
            .position(|l| l.first().map(String::as_str) == Some(name))
    }
    fn id_of(&self, name: &str) -> Option<u32> {
        self.find(name)
            .and_then(|i| self.lines[i].get(2)?.parse().ok())
    }
    fn ids(&self) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|l| l.get(2)?.parse().ok())
            .collect()
    }
    fn free_id(&self, other: &Table, system: bool) -> u32 {
        let used: Vec<u32> = self.ids().into_iter().chain(other.ids()).collect();
        let (lo, hi) = if system { (100, 999) } else { (1000, 59999) };
        (lo..=hi).find(|i| !used.contains(i)).unwrap_or(hi)
    }
    fn text(&self) -> String {
        self.lines.iter().map(|l| l.join(":") + "\n").collect()
    }
}

struct Prep<'a> {
    root: &'a Path,
    staging: PathBuf,
    journal: Journal,
    n: usize,
    /// Directories already planned (so each is created once).
    planned_dirs: BTreeMap<PathBuf, ()>,
}

impl Prep<'_> {
    /// Where `path` (absolute, in the node's view) lands under the root, with links in its
    /// parents followed inside the root; missing parents are planned as new directories.
    fn target(&mut self, f: &str, path: &str) -> Result<PathBuf, ApplyError> {
        let comps = components(Path::new(path)).ok_or_else(|| field(f, "`..` in the path"))?;
        let (name, parent) = comps.split_last().ok_or_else(|| field(f, "empty path"))?;
        let dir = self.dir(f, parent, 0o755, 0, 0)?;
        Ok(dir.join(name))
    }

    /// The real directory for `parent`, planning the creation of missing components.
    fn dir(
        &mut self,
        f: &str,
        parent: &[OsString],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<PathBuf, ApplyError> {
        let mut resolved = self.root.to_path_buf();
        for k in 1..=parent.len() {
            match resolve_in_root(self.root, &parent[..k], false)
                .map_err(|e| field(f, e.to_string()))?
            {
                Some(d) => resolved = d,
                None => {
                    let next = resolved.join(&parent[k - 1]);
                    if next.symlink_metadata().is_ok() && !self.planned_dirs.contains_key(&next) {
                        return Err(field(
                            f,
                            format!("{} is in the way: not a directory", shown(self.root, &next)),
                        ));
                    }
                    if !self.planned_dirs.contains_key(&next) {
                        self.planned_dirs.insert(next.clone(), ());
                        let m = if k == parent.len() { mode } else { 0o755 };
                        self.journal.dirs.push((next.clone(), m, uid, gid));
                    }
                    resolved = next;
                }
            }
        }
        Ok(resolved)
    }

    fn conflict(&self, f: &str, target: &Path, overwrite: bool) -> Result<(), ApplyError> {
        if !overwrite && target.symlink_metadata().is_ok() {
            return Err(field(
                f,
                format!(
                    "{} exists and `overwrite` is false",
                    shown(self.root, target)
                ),
            ));
        }
        if overwrite && target.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            return Err(field(
                f,
                format!(
                    "{} is a directory; Keel does not replace directories",
                    shown(self.root, target)
                ),
            ));
        }
        Ok(())
    }

    fn stage_file(
        &mut self,
        target: PathBuf,
        data: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), ApplyError> {
        self.n += 1;
        let staged = self.staging.join(format!("n{}", self.n));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .map_err(io_err(format!("staging {}", target.display())))?;
        io::Write::write_all(&mut f, data)
            .and_then(|_| f.sync_all())
            .map_err(io_err(format!("staging {}", target.display())))?;
        std::os::unix::fs::chown(&staged, Some(uid), Some(gid))
            .map_err(io_err(format!("owner of {}", target.display())))?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("mode of {}", target.display())))?;
        self.journal.moves.push(Move { target, staged });
        Ok(())
    }

    fn stage_symlink(&mut self, target: PathBuf, to: &str) -> Result<(), ApplyError> {
        self.n += 1;
        let staged = self.staging.join(format!("n{}", self.n));
        std::os::unix::fs::symlink(to, &staged)
            .map_err(io_err(format!("staging the link {}", target.display())))?;
        self.journal.moves.push(Move { target, staged });
        Ok(())
    }
}

fn shown(root: &Path, p: &Path) -> String {
    format!("/{}", p.strip_prefix(root).unwrap_or(p).display())
}

fn resolve_owner(f: &str, o: &Option<Owner>, table: &Table, what: &str) -> Result<u32, ApplyError> {
    match o {
        None => Ok(0),
        Some(Owner::Id(i)) => Ok(*i),
        Some(Owner::Name(n)) => table.id_of(n).ok_or_else(|| {
            field(
                f,
                format!("{what} `{n}` does not exist on this node or in this config"),
            )
        }),
    }
}

/// Undoes an interrupted commit recorded in staging, then removes staging. Every path of the
/// journal is resolved inside `root` ([`inside`]); backups are only `staging/backup/bN`;
/// entries that are neither are skipped.
pub fn roll_back(root: &Path) -> Result<bool, ApplyError> {
    check_keel_dir(root).map_err(io_err("checking /var/lib/keel"))?;
    let staging = root.join(STAGING);
    match fs::symlink_metadata(&staging) {
        Err(_) => return Ok(false),
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
            return Ok(true);
        }
        Ok(_) => {}
    }
    let backup_name = |n: &str| {
        n.strip_prefix('b')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Ok(bytes) = fs::read(staging.join("plan.json")) {
        if let Ok(j) = serde_json::from_slice::<Journal>(&bytes) {
            for p in j.placed.iter().rev() {
                if let Some(p) = inside(root, p) {
                    let _ = fs::remove_file(p);
                }
            }
            for (target, backup) in j.backups.iter().rev() {
                if let (Some(t), true) = (inside(root, target), backup_name(backup)) {
                    let _ = fs::rename(staging.join("backup").join(backup), t);
                }
            }
            for d in j.created_dirs.iter().rev() {
                if let Some(d) = inside(root, d) {
                    let _ = fs::remove_dir(d);
                }
            }
        }
    }
    fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    Ok(true)
}

/// Applies `plan` to `root` (see the module documentation), recording `source` in the stamp.
pub fn apply(root: &Path, plan: &Plan, source: &str) -> Result<Stamp, ApplyError> {
    roll_back(root)?;
    check_keel_dir(root).map_err(io_err("checking /var/lib/keel"))?;
    let staging = root.join(STAGING);
    fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
        .map_err(io_err("staging mode"))?;
    let result = (|| {
        let mut p = Prep {
            root,
            staging: staging.clone(),
            journal: Journal::default(),
            n: 0,
            planned_dirs: BTreeMap::new(),
        };
        prepare(&mut p, plan)?;
        commit(root, &staging, p.journal)?;
        enact_presets(root, plan)
    })();
    if let Err(e) = result {
        roll_back(root)?;
        return Err(e);
    }
    let s = Stamp {
        sha256: plan.sha256.clone(),
        version: plan.version.clone(),
        source: source.to_string(),
    };
    write_stamp(root, &s)?;
    fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    Ok(s)
}

/// Enables or disables now the units whose `enabled` the config sets, as `20-ignition.preset`
/// says: `systemctl --root ROOT preset` on those units (the image's presets were applied when it
/// was built, and systemd does not apply presets again on a node's first boot). After the commit,
/// so the config's own unit files are in place; a failure is undone with the commit. Re-running
/// it after an interrupted boot gives the same links.
fn enact_presets(root: &Path, plan: &Plan) -> Result<(), ApplyError> {
    let names: Vec<&str> = plan
        .units
        .iter()
        .filter(|u| u.enabled.is_some())
        .map(|u| u.name.as_str())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let mut cmd = std::process::Command::new("systemctl");
    cmd.arg(format!("--root={}", root.display()))
        .args(["--preset-mode=full", "preset", "--"])
        .args(&names);
    crate::tools::run(&mut cmd).map_err(|e| {
        field(
            "systemd.units",
            format!("enabling/disabling {}: {e}", names.join(", ")),
        )
    })
}

/// Writes the stamp atomically ([`crate::atomic`]), creating /var/lib/keel when the root does
/// not have it yet (a root created on this boot has only what the initrd put there).
pub fn write_stamp(root: &Path, s: &Stamp) -> Result<(), ApplyError> {
    check_keel_dir(root).map_err(io_err("checking /var/lib/keel"))?;
    let keel = root.join(KEEL_DIR);
    if !keel.exists() {
        // A root created on this boot without a TPM has no /var/lib/keel yet: root's alone
        // (/var and /var/lib with the modes systemd-tmpfiles gives them).
        for d in ["var", "var/lib"] {
            let p = root.join(d);
            if !p.exists() {
                fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(format!("mode of {}", p.display())))?;
            }
        }
        fs::create_dir(&keel).map_err(io_err(format!("creating {}", keel.display())))?;
        fs::set_permissions(&keel, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("mode of {}", keel.display())))?;
    }
    let stamp_path = root.join(STAMP);
    let bytes = serde_json::to_vec_pretty(s).map_err(|e| field("$", e.to_string()))?;
    crate::atomic::write(&stamp_path, &bytes, 0o644).map_err(|e| ApplyError::Io {
        context: e.to_string(),
        source: e.source,
    })
}

/// The node's account tables, read from its /etc and changed in memory.
struct Accounts {
    passwd: Table,
    group: Table,
    shadow: Table,
}

/// A user the config names, as it ends up: uid, primary gid, home directory.
type Home<'a> = (&'a UserOp, u32, u32, String);

fn prepare(p: &mut Prep, plan: &Plan) -> Result<(), ApplyError> {
    let etc = p.root.join("etc");
    let mut acc = Accounts {
        passwd: Table::read(&etc.join("passwd"))?,
        group: Table::read(&etc.join("group"))?,
        shadow: Table::read(&etc.join("shadow"))?,
    };
    add_groups(&mut acc, plan)?;
    let homes = add_users(&mut acc, plan)?;
    if !plan.users.is_empty() || !plan.groups.is_empty() {
        stage_accounts(p, &acc, &etc)?;
    }
    stage_homes(p, homes)?;
    stage_directories(p, plan, &acc)?;
    for f in &plan.files {
        stage_file_op(p, f, &acc.passwd, &acc.group)?;
    }
    stage_links(p, plan)?;
    stage_units(p, plan)
}

/// The config's groups that do not exist yet.
fn add_groups(acc: &mut Accounts, plan: &Plan) -> Result<(), ApplyError> {
    for g in &plan.groups {
        if acc.group.find(&g.name).is_some() {
            continue; // exists: nothing to change
        }
        let gid = g
            .gid
            .unwrap_or_else(|| acc.group.free_id(&Table::default(), g.system));
        if acc.group.ids().contains(&gid) {
            return Err(field(
                &format!("{}.gid", g.field),
                format!("gid {gid} is taken"),
            ));
        }
        acc.group.lines.push(vec![
            g.name.clone(),
            "x".into(),
            gid.to_string(),
            String::new(),
        ]);
    }
    Ok(())
}

/// The config's users: new ones added (with their own group when they name no primary group),
/// existing ones changed where the config says so; their group memberships.
fn add_users<'a>(acc: &mut Accounts, plan: &'a Plan) -> Result<Vec<Home<'a>>, ApplyError> {
    let mut homes = Vec::new();
    for u in &plan.users {
        let (uid, gid, home) = match acc.passwd.find(&u.name) {
            Some(i) => {
                let l = &mut acc.passwd.lines[i];
                if let Some(s) = &u.shell {
                    l[6] = s.clone();
                }
                if let Some(g) = &u.gecos {
                    l[4] = g.clone();
                }
                (
                    l[2].parse().unwrap_or(0),
                    l[3].parse().unwrap_or(0),
                    l[5].clone(),
                )
            }
            None => {
                let uid = u
                    .uid
                    .unwrap_or_else(|| acc.passwd.free_id(&acc.group, u.system));
                if acc.passwd.ids().contains(&uid) {
                    return Err(field(
                        &format!("{}.uid", u.field),
                        format!("uid {uid} is taken"),
                    ));
                }
                let gid = match &u.primary_group {
                    Some(g) => acc.group.id_of(g).ok_or_else(|| {
                        field(
                            &format!("{}.primaryGroup", u.field),
                            format!("group `{g}` does not exist"),
                        )
                    })?,
                    None => match acc.group.id_of(&u.name) {
                        Some(g) => g,
                        None => {
                            let gid = if acc.group.ids().contains(&uid) {
                                acc.group.free_id(&Table::default(), u.system)
                            } else {
                                uid
                            };
                            acc.group.lines.push(vec![
                                u.name.clone(),
                                "x".into(),
                                gid.to_string(),
                                String::new(),
                            ]);
                            gid
                        }
                    },
                };
                let home = u
                    .home
                    .clone()
                    .unwrap_or_else(|| format!("/home/{}", u.name));
                let shell = u.shell.clone().unwrap_or_else(|| "/bin/bash".into());
                acc.passwd.lines.push(vec![
                    u.name.clone(),
                    "x".into(),
                    uid.to_string(),
                    gid.to_string(),
                    u.gecos.clone().unwrap_or_default(),
                    home.clone(),
                    shell,
                ]);
                acc.shadow.lines.push(shadow_entry(&u.name, "!*"));
                (uid, gid, home)
            }
        };
        if let Some(h) = &u.password_hash {
            match acc.shadow.find(&u.name) {
                Some(i) => acc.shadow.lines[i][1] = h.clone(),
                None => acc.shadow.lines.push(shadow_entry(&u.name, h)),
            }
        }
        for g in &u.groups {
            let i = acc.group.find(g).ok_or_else(|| {
                field(
                    &format!("{}.groups", u.field),
                    format!("group `{g}` does not exist on this node or in this config"),
                )
            })?;
            let members = &mut acc.group.lines[i];
            while members.len() < 4 {
                members.push(String::new());
            }
            let mut list: Vec<String> = members[3]
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if !list.contains(&u.name) {
                list.push(u.name.clone());
            }
            members[3] = list.join(",");
        }
        homes.push((u, uid, gid, home));
    }
    Ok(homes)
}

/// A new /etc/shadow line: the user, the password hash (`!*`: locked), no expiry.
fn shadow_entry(name: &str, hash: &str) -> Vec<String> {
    let fields = [name, hash, "", "0", "99999", "7", "", "", ""];
    fields.iter().map(|f| f.to_string()).collect()
}

/// /etc/passwd, group and shadow, staged whole.
fn stage_accounts(p: &mut Prep, acc: &Accounts, etc: &Path) -> Result<(), ApplyError> {
    {
        for (name, t, mode) in [
            ("passwd", &acc.passwd, 0o644),
            ("group", &acc.group, 0o644),
            ("shadow", &acc.shadow, 0o640),
        ] {
            let target = etc.join(name);
            let gid = if name == "shadow" {
                acc.group.id_of("shadow").unwrap_or(0)
            } else {
                0
            };
            p.stage_file(target, t.text().as_bytes(), mode, 0, gid)?;
        }
    }
    Ok(())
}

/// Home directories and authorized SSH keys.
fn stage_homes(p: &mut Prep, homes: Vec<Home>) -> Result<(), ApplyError> {
    for (u, uid, gid, home) in homes {
        if u.no_create_home && u.ssh_keys.is_empty() {
            continue;
        }
        let hc = components(Path::new(&home))
            .ok_or_else(|| field(&format!("{}.homeDir", u.field), "`..` in the path"))?;
        p.dir(&u.field, &hc, 0o700, uid, gid)?;
        if !u.ssh_keys.is_empty() {
            let ssh = p.dir(
                &u.field,
                &[hc.clone(), vec![OsString::from(".ssh")]].concat(),
                0o700,
                uid,
                gid,
            )?;
            let keys: String = u
                .ssh_keys
                .iter()
                .map(|k| format!("{}\n", k.trim()))
                .collect();
            p.stage_file(
                ssh.join("authorized_keys"),
                keys.as_bytes(),
                0o600,
                uid,
                gid,
            )?;
        }
    }
    Ok(())
}

/// Directories that do not exist yet (an existing one is kept as it is).
fn stage_directories(p: &mut Prep, plan: &Plan, acc: &Accounts) -> Result<(), ApplyError> {
    let root = p.root;
    for d in &plan.directories {
        let comps =
            components(Path::new(&d.path)).ok_or_else(|| field(&d.field, "`..` in the path"))?;
        let uid = resolve_owner(&format!("{}.user", d.field), &d.user, &acc.passwd, "user")?;
        let gid = resolve_owner(&format!("{}.group", d.field), &d.group, &acc.group, "group")?;
        // An existing directory is fine, and kept as it is.
        if resolve_in_root(root, &comps, false)
            .map_err(|e| field(&d.field, e.to_string()))?
            .is_none()
        {
            p.dir(&d.field, &comps, d.mode, uid, gid)?;
        }
    }
    Ok(())
}

/// Symbolic links, and hard links to files already on the node.
fn stage_links(p: &mut Prep, plan: &Plan) -> Result<(), ApplyError> {
    let root = p.root;
    for l in &plan.links {
        let t = p.target(&l.field, &l.path)?;
        p.conflict(&l.field, &t, l.overwrite)?;
        if l.hard {
            let comps = components(Path::new(&l.target))
                .ok_or_else(|| field(&format!("{}.target", l.field), "`..`"))?;
            let (name, parent) = comps
                .split_last()
                .ok_or_else(|| field(&l.field, "empty target"))?;
            let src = resolve_in_root(root, parent, false)
                .map_err(|e| field(&l.field, e.to_string()))?
                .map(|d| d.join(name))
                .filter(|s| s.symlink_metadata().is_ok_and(|m| m.is_file()))
                .ok_or_else(|| {
                    field(
                        &format!("{}.target", l.field),
                        format!("{} is not an existing file", l.target),
                    )
                })?;
            p.n += 1;
            let staged = p.staging.join(format!("n{}", p.n));
            fs::hard_link(&src, &staged)
                .map_err(io_err(format!("staging the hard link {}", l.path)))?;
            p.journal.moves.push(Move { target: t, staged });
        } else {
            p.stage_symlink(t, &l.target)?;
        }
    }
    Ok(())
}

/// Unit files, drop-ins, masks, and the preset file for the units the config enables or
/// disables.
fn stage_units(p: &mut Prep, plan: &Plan) -> Result<(), ApplyError> {
    let mut preset = String::new();
    for u in &plan.units {
        let dir = "/etc/systemd/system";
        if u.mask {
            let t = p.target(&u.field, &format!("{dir}/{}", u.name))?;
            p.stage_symlink(t, "/dev/null")?;
        }
        if let Some(c) = &u.contents {
            let t = p.target(&u.field, &format!("{dir}/{}", u.name))?;
            p.stage_file(t, c.as_bytes(), 0o644, 0, 0)?;
        }
        for (name, c) in &u.dropins {
            let t = p.target(&u.field, &format!("{dir}/{}.d/{name}", u.name))?;
            p.stage_file(t, c.as_bytes(), 0o644, 0, 0)?;
        }
        match u.enabled {
            Some(true) => preset.push_str(&format!("enable {}\n", u.name)),
            Some(false) => preset.push_str(&format!("disable {}\n", u.name)),
            None => {}
        }
    }
    if !preset.is_empty() {
        // Enacted right after the commit (`enact_presets`); kept so that a later `systemctl
        // preset` on the node agrees. It sorts before the image's 40-keel.preset, so it wins.
        let t = p.target(
            "systemd.units",
            "/etc/systemd/system-preset/20-ignition.preset",
        )?;
        p.stage_file(
            t,
            format!("# Written by Keel from the Ignition config\n{preset}").as_bytes(),
            0o644,
            0,
            0,
        )?;
    }
    Ok(())
}

fn stage_file_op(
    p: &mut Prep,
    f: &FileOp,
    passwd: &Table,
    group: &Table,
) -> Result<(), ApplyError> {
    let t = p.target(&format!("{}.path", f.field), &f.path)?;
    p.conflict(&format!("{}.overwrite", f.field), &t, f.overwrite)?;
    let uid = resolve_owner(&format!("{}.user", f.field), &f.user, passwd, "user")?;
    let gid = resolve_owner(&format!("{}.group", f.field), &f.group, group, "group")?;
    p.stage_file(t, &f.contents, f.mode, uid, gid)
}

fn commit(root: &Path, staging: &Path, mut j: Journal) -> Result<(), ApplyError> {
    let plan_path = staging.join("plan.json");
    let save = |j: &Journal| -> Result<(), ApplyError> {
        let bytes = serde_json::to_vec(j).map_err(|e| field("$", e.to_string()))?;
        crate::atomic::write(&plan_path, &bytes, 0o600).map_err(|e| ApplyError::Io {
            context: format!("recording the provisioning plan ({})", e.step),
            source: e.source,
        })
    };
    save(&j)?;
    let backup_dir = staging.join("backup");
    fs::create_dir_all(&backup_dir).map_err(io_err("creating the backup directory"))?;
    for (d, mode, uid, gid) in j.dirs.clone() {
        if d.symlink_metadata().is_ok() {
            continue;
        }
        fs::create_dir(&d).map_err(io_err(format!("creating {}", shown(root, &d))))?;
        j.created_dirs.push(relative(root, &d));
        save(&j)?;
        std::os::unix::fs::chown(&d, Some(uid), Some(gid))
            .map_err(io_err(format!("owner of {}", shown(root, &d))))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("mode of {}", shown(root, &d))))?;
    }
    for (i, m) in j.moves.clone().into_iter().enumerate() {
        if m.target.symlink_metadata().is_ok() {
            let b = backup_dir.join(format!("b{i}"));
            fs::rename(&m.target, &b)
                .map_err(io_err(format!("setting aside {}", shown(root, &m.target))))?;
            j.backups.push((relative(root, &m.target), format!("b{i}")));
        }
        j.placed.push(relative(root, &m.target));
        save(&j)?;
        fs::rename(&m.staged, &m.target).map_err(io_err(format!(
            "moving {} into place",
            shown(root, &m.target)
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::config::parse;
    use super::*;

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let etc = t.path().join("etc");
        fs::create_dir_all(etc.join("systemd/system")).expect("etc");
        fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").expect("passwd");
        fs::write(etc.join("group"), "root:x:0:\nsudo:x:27:\nshadow:x:42:\n").expect("group");
        fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").expect("shadow");
        fs::write(etc.join("hostname"), "cluster-node\n").expect("hostname");
        fs::create_dir_all(t.path().join("var/lib/keel")).expect("var");
        // An image unit enabled by the image's presets at build time, as the factory /etc has it.
        let units = t.path().join("usr/lib/systemd/system");
        fs::create_dir_all(&units).expect("usr");
        fs::write(
            units.join("etcd.service"),
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
        )
        .expect("unit");
        fs::create_dir_all(t.path().join("usr/lib/systemd/system-preset")).expect("presets");
        fs::write(
            t.path()
                .join("usr/lib/systemd/system-preset/40-keel.preset"),
            "enable etcd.service\ndisable *\n",
        )
        .expect("preset");
        fs::create_dir_all(etc.join("systemd/system/multi-user.target.wants")).expect("wants");
        std::os::unix::fs::symlink(
            "/usr/lib/systemd/system/etcd.service",
            etc.join("systemd/system/multi-user.target.wants/etcd.service"),
        )
        .expect("link");
        t
    }

    const FULL: &str = r#"{"ignition":{"version":"3.4.0"},
      "storage":{
        "files":[{"path":"/etc/hostname","overwrite":true,"contents":{"source":"data:,node-7%0A"}},
                 {"path":"/var/lib/demo/data.txt","mode":416,"user":{"name":"core"},"contents":{"source":"data:,hello"}}],
        "directories":[{"path":"/var/lib/demo/cache","mode":448}],
        "links":[{"path":"/etc/demo-link","target":"/var/lib/demo/data.txt"}]},
      "systemd":{"units":[{"name":"demo.service","enabled":true,"contents":"[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"},
                          {"name":"etcd.service","enabled":false,"dropins":[{"name":"20-x.conf","contents":"[Service]\n"}]},
                          {"name":"bad.service","mask":true}]},
      "passwd":{"users":[{"name":"core","sshAuthorizedKeys":["ssh-ed25519 AAAAC3 core@test"],"groups":["sudo"],"passwordHash":"$6$x$y"}],
                "groups":[{"name":"ops","gid":2000}]}}"#;

    #[test]
    fn a_full_config_lands_and_is_stamped() {
        let t = root();
        let r = t.path();
        let plan = parse(FULL.as_bytes()).expect("valid");
        let s = apply(r, &plan, "test").expect("applies");
        assert_eq!(s.sha256, plan.sha256);
        assert_eq!(
            stamp(r).expect("readable").expect("stamp").sha256,
            plan.sha256
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).expect("hostname"),
            "node-7\n"
        );
        let data = r.join("var/lib/demo/data.txt");
        assert_eq!(fs::read_to_string(&data).expect("data"), "hello");
        assert_eq!(
            fs::metadata(&data).expect("meta").permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::metadata(r.join("var/lib/demo/cache"))
                .expect("dir")
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(
            fs::read_link(r.join("etc/demo-link")).expect("link"),
            Path::new("/var/lib/demo/data.txt")
        );
        assert!(
            fs::read_to_string(r.join("etc/systemd/system/demo.service"))
                .expect("unit")
                .contains("ExecStart")
        );
        assert!(r
            .join("etc/systemd/system/etcd.service.d/20-x.conf")
            .exists());
        assert_eq!(
            fs::read_link(r.join("etc/systemd/system/bad.service")).expect("mask"),
            Path::new("/dev/null")
        );
        let preset = fs::read_to_string(r.join("etc/systemd/system-preset/20-ignition.preset"))
            .expect("preset");
        assert!(
            preset.contains("enable demo.service\ndisable etcd.service"),
            "{preset}"
        );
        // Enacted by systemctl: the config's unit is enabled, the image's unit the config
        // disables is no longer (its link from the build's presets is gone).
        let wants = r.join("etc/systemd/system/multi-user.target.wants");
        assert_eq!(
            fs::read_link(wants.join("demo.service")).expect("demo.service enabled"),
            Path::new("/etc/systemd/system/demo.service")
        );
        assert!(
            fs::symlink_metadata(wants.join("etcd.service")).is_err(),
            "etcd.service still enabled"
        );
        let passwd = fs::read_to_string(r.join("etc/passwd")).expect("passwd");
        assert!(
            passwd.contains("core:x:1000:1000::/home/core:/bin/bash"),
            "{passwd}"
        );
        let group = fs::read_to_string(r.join("etc/group")).expect("group");
        assert!(
            group.contains("sudo:x:27:core")
                && group.contains("ops:x:2000:")
                && group.contains("core:x:1000:"),
            "{group}"
        );
        assert!(fs::read_to_string(r.join("etc/shadow"))
            .expect("shadow")
            .contains("core:$6$x$y:"));
        let keys = r.join("home/core/.ssh/authorized_keys");
        assert_eq!(
            fs::read_to_string(&keys).expect("keys"),
            "ssh-ed25519 AAAAC3 core@test\n"
        );
        assert_eq!(
            fs::metadata(&keys).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(!r.join(STAGING).exists(), "staging removed");
    }

    /// A failure in preparation leaves the root exactly as it was.
    #[test]
    fn a_conflict_writes_nothing() {
        let t = root();
        let r = t.path();
        let before = snapshot(r);
        // /etc/hostname exists and overwrite is false: refused after other entries were staged.
        let c = r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[
            {"path":"/var/lib/demo/first","contents":{"source":"data:,x"}},
            {"path":"/etc/hostname","contents":{"source":"data:,y"}}]},
            "passwd":{"users":[{"name":"core"}]}}"#;
        let e = apply(r, &parse(c.as_bytes()).expect("valid"), "test").expect_err("conflict");
        assert!(
            e.to_string()
                .starts_with("storage.files.1.overwrite: /etc/hostname exists"),
            "{e}"
        );
        assert_eq!(snapshot(r), before, "nothing changed");
        assert!(stamp(r).expect("readable").is_none());
        let c = r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/etc/x","user":{"name":"nobody-here"}}]}}"#;
        let e = apply(r, &parse(c.as_bytes()).expect("valid"), "test").expect_err("owner");
        assert!(
            e.to_string()
                .contains("storage.files.0.user: user `nobody-here` does not exist"),
            "{e}"
        );
        assert_eq!(snapshot(r), before);
    }

    /// A unit the config enables but that exists neither in the config nor in the image: systemctl
    /// refuses it after the commit, and the commit is undone (the config's files are gone again).
    #[test]
    fn enabling_a_unit_that_does_not_exist_is_undone() {
        let t = root();
        let r = t.path();
        let before = snapshot(r);
        let c = r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[
            {"path":"/var/lib/demo/first","contents":{"source":"data:,x"}}]},
            "systemd":{"units":[{"name":"ghost.service","enabled":true}]}}"#;
        let e = apply(r, &parse(c.as_bytes()).expect("valid"), "test").expect_err("no such unit");
        let msg = e.to_string();
        assert!(
            msg.starts_with("systemd.units: enabling/disabling ghost.service:")
                && msg.contains("ghost.service does not exist"),
            "{msg}"
        );
        assert_eq!(snapshot(r), before, "nothing changed");
        assert!(stamp(r).expect("readable").is_none());
    }

    /// A commit interrupted half way (here: a plan.json with some moves done) is undone by the
    /// next attempt, which then applies the config from scratch.
    #[test]
    fn an_interrupted_commit_is_rolled_back() {
        let t = root();
        let r = t.path();
        let before = snapshot(r);
        let plan = parse(FULL.as_bytes()).expect("valid");
        apply(r, &plan, "test").expect("applies");
        // Simulate: same work, stopped before the stamp. Re-create staging state by hand: move
        // hostname aside as the commit would, and record it.
        fs::remove_file(r.join(STAMP)).expect("rm stamp");
        let staging = r.join(STAGING);
        fs::create_dir_all(staging.join("backup")).expect("staging");
        fs::rename(r.join("etc/hostname"), staging.join("backup/b0")).expect("aside");
        fs::write(r.join("etc/hostname"), "half\n").expect("placed");
        let j = Journal {
            backups: vec![(PathBuf::from("etc/hostname"), "b0".into())],
            placed: vec![PathBuf::from("etc/hostname")],
            created_dirs: vec![],
            ..Journal::default()
        };
        fs::write(
            staging.join("plan.json"),
            serde_json::to_vec(&j).expect("json"),
        )
        .expect("plan");
        assert!(roll_back(r).expect("rollback"));
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).expect("hostname"),
            "node-7\n",
            "backup restored"
        );
        assert!(!staging.exists());
        // And a full failed apply leaves the tree as before it.
        let t2 = root();
        let bad = r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/var/x","contents":{"source":"data:,x"}}]},"passwd":{"users":[{"name":"u","groups":["nope"]}]}}"#;
        apply(t2.path(), &parse(bad.as_bytes()).expect("valid"), "test")
            .expect_err("unknown group");
        assert_eq!(snapshot(t2.path()), snapshot(root().path()));
        let _ = before;
    }

    fn snapshot(r: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(r)
            .into_iter()
            .filter_map(|e| e.ok())
            .map(|e| {
                let p = e
                    .path()
                    .strip_prefix(r)
                    .expect("inside")
                    .display()
                    .to_string();
                let data = if e.file_type().is_file() {
                    fs::read(e.path()).expect("read")
                } else {
                    vec![]
                };
                (p, data)
            })
            .collect();
        v.sort();
        v
    }
}
