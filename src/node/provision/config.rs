//! Ignition configs (spec 3.0–3.6, parsed with the `ignition-config` crate) turned into a plan
//! Keel can apply: every field is either supported and checked, or refused by name. Nothing is
//! read from or written to a machine here; `keel ignition validate` and the node run this same
//! code.

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256, Sha512};
use std::io::Read;

/// Largest config accepted, and largest decompressed file.
pub const MAX_CONFIG: usize = 4 << 20;
const MAX_FILE: u64 = 64 << 20;
/// All files of a config together, decoded: everything is held in memory in the initrd.
const MAX_FILES_TOTAL: u64 = 256 << 20;

/// A problem with a config, naming the field (`storage.files.2.path`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Owner of a node: by id or by name (resolved against the machine's, or this config's, users).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Id(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    pub field: String,
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub user: Option<Owner>,
    pub group: Option<Owner>,
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirOp {
    pub field: String,
    pub path: String,
    pub mode: u32,
    pub user: Option<Owner>,
    pub group: Option<Owner>,
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOp {
    pub field: String,
    pub path: String,
    pub target: String,
    pub hard: bool,
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitOp {
    pub field: String,
    pub name: String,
    pub contents: Option<String>,
    pub enabled: Option<bool>,
    pub mask: bool,
    /// (file name, contents)
    pub dropins: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserOp {
    pub field: String,
    pub name: String,
    pub uid: Option<u32>,
    pub password_hash: Option<String>,
    pub ssh_keys: Vec<String>,
    pub groups: Vec<String>,
    pub gecos: Option<String>,
    pub home: Option<String>,
    pub no_create_home: bool,
    pub shell: Option<String>,
    pub primary_group: Option<String>,
    pub system: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOp {
    pub field: String,
    pub name: String,
    pub gid: Option<u32>,
    pub system: bool,
}

/// Everything a config asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// sha256 (hex) of the config as measured into PCR 12: its bytes' hash
    /// (`crate::attest::measured_config_sha256` says the one exception).
    pub sha256: String,
    pub version: String,
    pub groups: Vec<GroupOp>,
    pub users: Vec<UserOp>,
    pub directories: Vec<DirOp>,
    pub files: Vec<FileOp>,
    pub links: Vec<LinkOp>,
    pub units: Vec<UnitOp>,
}

// The parts of the (newest) schema Keel reads, after the crate has checked the config against
// its own version's schema. Unsupported fields are kept as raw values so they can be refused by
// name.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Cfg {
    ignition: Ign,
    #[serde(default)]
    storage: Storage,
    #[serde(default)]
    systemd: Systemd,
    #[serde(default)]
    passwd: Passwd,
    kernel_arguments: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Ign {
    version: String,
    config: Option<Value>,
    proxy: Option<Value>,
    security: Option<Value>,
    timeouts: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Storage {
    directories: Option<Vec<Node>>,
    files: Option<Vec<Node>>,
    links: Option<Vec<Node>>,
    disks: Option<Value>,
    filesystems: Option<Value>,
    luks: Option<Value>,
    raid: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Node {
    path: String,
    overwrite: Option<bool>,
    mode: Option<i64>,
    user: Option<NodeOwner>,
    group: Option<NodeOwner>,
    contents: Option<Resource>,
    append: Option<Vec<Value>>,
    target: Option<String>,
    hard: Option<bool>,
}

#[derive(Deserialize, Default)]
struct NodeOwner {
    id: Option<i64>,
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Resource {
    source: Option<String>,
    compression: Option<String>,
    verification: Option<Verification>,
    http_headers: Option<Value>,
}

#[derive(Deserialize, Default)]
struct Verification {
    hash: Option<String>,
}

#[derive(Deserialize, Default)]
struct Systemd {
    units: Option<Vec<Unit>>,
}

#[derive(Deserialize, Default)]
struct Unit {
    name: String,
    contents: Option<String>,
    enabled: Option<bool>,
    mask: Option<bool>,
    dropins: Option<Vec<Dropin>>,
}

#[derive(Deserialize, Default)]
struct Dropin {
    name: String,
    contents: Option<String>,
}

#[derive(Deserialize, Default)]
struct Passwd {
    users: Option<Vec<User>>,
    groups: Option<Vec<Group>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct User {
    name: String,
    uid: Option<i64>,
    password_hash: Option<String>,
    ssh_authorized_keys: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    gecos: Option<String>,
    home_dir: Option<String>,
    no_create_home: Option<bool>,
    shell: Option<String>,
    primary_group: Option<String>,
    system: Option<bool>,
    no_user_group: Option<bool>,
    no_log_init: Option<bool>,
    should_exist: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Group {
    name: String,
    gid: Option<i64>,
    password_hash: Option<String>,
    system: Option<bool>,
    should_exist: Option<bool>,
}

fn is_set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => o.values().any(|v| is_set(&Some(v.clone()))),
        Some(_) => true,
    }
}

/// Parses and checks a config; every error names its field.
pub fn parse(bytes: &[u8]) -> Result<Plan, ConfigError> {
    let cfg = decode(bytes)?;
    refuse_unsupported(&cfg)?;
    Ok(Plan {
        sha256: crate::attest::measured_config_sha256(bytes),
        version: cfg.ignition.version.clone(),
        groups: plan_groups(cfg.passwd.groups.unwrap_or_default())?,
        users: plan_users(cfg.passwd.users.unwrap_or_default())?,
        directories: plan_directories(cfg.storage.directories.unwrap_or_default())?,
        files: plan_files(cfg.storage.files.unwrap_or_default())?,
        links: plan_links(cfg.storage.links.unwrap_or_default())?,
        units: plan_units(cfg.systemd.units.unwrap_or_default())?,
    })
}

/// The config as the spec version it names (ignition-config), then as Keel's view of it; an
/// unknown field is an error.
fn decode(bytes: &[u8]) -> Result<Cfg, ConfigError> {
    if bytes.len() > MAX_CONFIG {
        return Err(err("$", format!("config larger than {MAX_CONFIG} bytes")));
    }
    let (typed, warnings) = ignition_config::Config::parse_slice(bytes).map_err(|e| match e {
        ignition_config::Error::UnknownVersion(v) => err(
            "ignition.version",
            format!("spec version {v} is not supported (Keel reads 3.0.0 to 3.6.0)"),
        ),
        ignition_config::Error::InvalidVersion(e) => err("ignition.version", e.to_string()),
        other => err("$", format!("not a valid Ignition config: {other}")),
    })?;
    if let Some(w) = warnings.first() {
        let ignition_config::Warning::UnusedKey(k) = w else {
            return Err(err("$", w.to_string()));
        };
        return Err(err(
            k.trim_start_matches("$."),
            "unknown field for this spec version",
        ));
    }
    let v = serde_json::to_value(&typed).map_err(|e| err("$", e.to_string()))?;
    let cfg: Cfg = serde_json::from_value(v).map_err(|e| err("$", e.to_string()))?;
    Ok(cfg)
}

/// Sections Keel does not do (yet) are refused by name instead of silently ignored.
fn refuse_unsupported(cfg: &Cfg) -> Result<(), ConfigError> {
    let refused: [(&str, bool, &str); 8] = [
        (
            "ignition.config",
            is_set(&cfg.ignition.config),
            "merging or replacing configs from other sources is not supported",
        ),
        (
            "ignition.proxy",
            is_set(&cfg.ignition.proxy),
            "remote sources are not supported yet",
        ),
        (
            "ignition.security",
            is_set(&cfg.ignition.security),
            "remote sources (and their TLS settings) are not supported yet",
        ),
        (
            "storage.disks",
            is_set(&cfg.storage.disks),
            "Keel's disk layout is fixed by the image (A/B /usr, sealed root)",
        ),
        (
            "storage.filesystems",
            is_set(&cfg.storage.filesystems),
            "Keel's file systems are made by the image and the initrd",
        ),
        (
            "storage.luks",
            is_set(&cfg.storage.luks),
            "the root volume is already LUKS2, sealed to the TPM by Keel",
        ),
        ("storage.raid", is_set(&cfg.storage.raid), "not supported"),
        (
            "kernelArguments",
            is_set(&cfg.kernel_arguments),
            "the kernel command line is part of the signed UKI; change it in the image definition",
        ),
    ];
    if let Some((field, _, why)) = refused.iter().find(|(_, set, _)| *set) {
        return Err(err(*field, format!("not supported by Keel: {why}")));
    }
    let _ = &cfg.ignition.timeouts; // harmless: nothing is fetched
    Ok(())
}

/// `passwd.groups`.
fn plan_groups(groups: Vec<Group>) -> Result<Vec<GroupOp>, ConfigError> {
    let mut out = Vec::new();
    for (i, g) in groups.into_iter().enumerate() {
        let f = format!("passwd.groups.{i}");
        check_name(&format!("{f}.name"), &g.name)?;
        if g.password_hash.is_some() {
            return Err(err(
                format!("{f}.passwordHash"),
                "group passwords are not supported",
            ));
        }
        if g.should_exist == Some(false) {
            return Err(err(
                format!("{f}.shouldExist"),
                "removing groups is not supported",
            ));
        }
        out.push(GroupOp {
            gid: id(&format!("{f}.gid"), g.gid)?,
            system: g.system.unwrap_or(false),
            name: g.name,
            field: f,
        });
    }
    Ok(out)
}

/// `passwd.users`.
fn plan_users(users: Vec<User>) -> Result<Vec<UserOp>, ConfigError> {
    let mut out = Vec::new();
    for (i, u) in users.into_iter().enumerate() {
        let f = format!("passwd.users.{i}");
        check_name(&format!("{f}.name"), &u.name)?;
        for (name, set) in [
            ("noUserGroup", u.no_user_group.is_some()),
            ("noLogInit", u.no_log_init.is_some()),
        ] {
            if set {
                return Err(err(format!("{f}.{name}"), "not supported by Keel"));
            }
        }
        if u.should_exist == Some(false) {
            return Err(err(
                format!("{f}.shouldExist"),
                "removing users is not supported",
            ));
        }
        for (k, key) in u.ssh_authorized_keys.iter().flatten().enumerate() {
            if key.contains('\n') || key.trim().is_empty() {
                return Err(err(
                    format!("{f}.sshAuthorizedKeys.{k}"),
                    "one key per entry, on one line",
                ));
            }
        }
        for (name, val) in [("homeDir", &u.home_dir), ("shell", &u.shell)] {
            if let Some(p) = val {
                check_path(&format!("{f}.{name}"), p, name == "homeDir")?;
                check_passwd_field(&format!("{f}.{name}"), p)?;
            }
        }
        if let Some(g) = &u.gecos {
            check_passwd_field(&format!("{f}.gecos"), g)?;
        }
        if let Some(h) = &u.password_hash {
            if h.contains(':') || h.contains('\n') {
                return Err(err(format!("{f}.passwordHash"), "not a crypt(3) hash"));
            }
        }
        out.push(UserOp {
            uid: id(&format!("{f}.uid"), u.uid)?,
            password_hash: u.password_hash,
            ssh_keys: u.ssh_authorized_keys.unwrap_or_default(),
            groups: u.groups.unwrap_or_default(),
            gecos: u.gecos,
            home: u.home_dir,
            no_create_home: u.no_create_home.unwrap_or(false),
            shell: u.shell,
            primary_group: u.primary_group,
            system: u.system.unwrap_or(false),
            name: u.name,
            field: f,
        });
    }
    Ok(out)
}

/// `storage.directories`.
fn plan_directories(nodes: Vec<Node>) -> Result<Vec<DirOp>, ConfigError> {
    let mut out = Vec::new();
    for (i, n) in nodes.into_iter().enumerate() {
        let f = format!("storage.directories.{i}");
        check_path(&format!("{f}.path"), &n.path, true)?;
        out.push(DirOp {
            mode: mode(&format!("{f}.mode"), n.mode, 0o755)?,
            user: owner(&format!("{f}.user"), n.user)?,
            group: owner(&format!("{f}.group"), n.group)?,
            overwrite: n.overwrite.unwrap_or(false),
            path: n.path,
            field: f,
        });
    }
    Ok(out)
}

/// `storage.files`.
fn plan_files(nodes: Vec<Node>) -> Result<Vec<FileOp>, ConfigError> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for (i, n) in nodes.into_iter().enumerate() {
        let f = format!("storage.files.{i}");
        check_path(&format!("{f}.path"), &n.path, true)?;
        if n.append.as_ref().is_some_and(|a| !a.is_empty()) {
            return Err(err(
                format!("{f}.append"),
                "appending to files is not supported",
            ));
        }
        let contents = match n.contents {
            Some(r) => resource(&format!("{f}.contents"), r)?,
            None => Vec::new(),
        };
        total += contents.len() as u64;
        if total > MAX_FILES_TOTAL {
            return Err(err(
                format!("{f}.contents"),
                format!("the config's files add up to more than {MAX_FILES_TOTAL} bytes"),
            ));
        }
        out.push(FileOp {
            contents,
            mode: mode(&format!("{f}.mode"), n.mode, 0o644)?,
            user: owner(&format!("{f}.user"), n.user)?,
            group: owner(&format!("{f}.group"), n.group)?,
            overwrite: n.overwrite.unwrap_or(false),
            path: n.path,
            field: f,
        });
    }
    Ok(out)
}

/// `storage.links`.
fn plan_links(nodes: Vec<Node>) -> Result<Vec<LinkOp>, ConfigError> {
    let mut out = Vec::new();
    for (i, n) in nodes.into_iter().enumerate() {
        let f = format!("storage.links.{i}");
        check_path(&format!("{f}.path"), &n.path, true)?;
        let target = n
            .target
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err(format!("{f}.target"), "missing"))?;
        let hard = n.hard.unwrap_or(false);
        if hard {
            check_path(&format!("{f}.target"), &target, false)?;
        }
        if n.user.is_some() || n.group.is_some() {
            return Err(err(format!("{f}.user"), "link ownership is not supported"));
        }
        out.push(LinkOp {
            target,
            hard,
            overwrite: n.overwrite.unwrap_or(false),
            path: n.path,
            field: f,
        });
    }
    Ok(out)
}

/// `systemd.units`.
fn plan_units(units: Vec<Unit>) -> Result<Vec<UnitOp>, ConfigError> {
    let mut out = Vec::new();
    for (i, u) in units.into_iter().enumerate() {
        let f = format!("systemd.units.{i}");
        check_unit_name(&format!("{f}.name"), &u.name)?;
        let mut dropins = Vec::new();
        for (k, d) in u.dropins.unwrap_or_default().into_iter().enumerate() {
            if !d.name.ends_with(".conf") || d.name.contains('/') {
                return Err(err(
                    format!("{f}.dropins.{k}.name"),
                    "a drop-in is a file name ending in .conf",
                ));
            }
            dropins.push((d.name, d.contents.unwrap_or_default()));
        }
        let mask = u.mask.unwrap_or(false);
        if mask && (u.contents.is_some() || u.enabled == Some(true)) {
            return Err(err(
                format!("{f}.mask"),
                "a masked unit cannot have contents or be enabled",
            ));
        }
        out.push(UnitOp {
            contents: u.contents,
            enabled: u.enabled,
            mask,
            dropins,
            name: u.name,
            field: f,
        });
    }
    Ok(out)
}

fn id(field: &str, v: Option<i64>) -> Result<Option<u32>, ConfigError> {
    v.map(|n| u32::try_from(n).map_err(|_| err(field, format!("{n} is not a valid id"))))
        .transpose()
}

fn mode(field: &str, v: Option<i64>, default: u32) -> Result<u32, ConfigError> {
    match v {
        None => Ok(default),
        Some(m) if (0..=0o7777).contains(&m) => Ok(m as u32),
        Some(m) => Err(err(
            field,
            format!("{m} is not a file mode (decimal, at most 4095 = 0o7777)"),
        )),
    }
}

fn owner(field: &str, o: Option<NodeOwner>) -> Result<Option<Owner>, ConfigError> {
    let Some(o) = o else { return Ok(None) };
    match (o.id, o.name) {
        (Some(_), Some(_)) => Err(err(field, "give id or name, not both")),
        (Some(i), None) => Ok(id(&format!("{field}.id"), Some(i))?.map(Owner::Id)),
        (None, Some(n)) => Ok(Some(Owner::Name(n))),
        (None, None) => Ok(None),
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("`{name}` is not a valid user or group name"),
        ))
    }
}

/// A field of /etc/passwd (`gecos`, `homeDir`, `shell`): `:` would start the next field and a
/// line break the next account.
fn check_passwd_field(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.contains(':') || value.chars().any(char::is_control) {
        return Err(err(
            field,
            "may not contain `:`, line breaks or other control characters (it becomes a field of /etc/passwd)",
        ));
    }
    Ok(())
}

fn check_unit_name(field: &str, name: &str) -> Result<(), ConfigError> {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".timer",
        ".target",
        ".path",
        ".mount",
        ".automount",
        ".swap",
        ".slice",
        ".scope",
    ];
    let ok = !name.contains('/')
        && !name.starts_with('.')
        && SUFFIXES
            .iter()
            .any(|s| name.len() > s.len() && name.ends_with(s));
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("`{name}` is not a systemd unit name")))
    }
}

/// Absolute, normal (no `.` or `..`), and (when `writable`) not under /usr, which is the
/// read-only, verity-protected image.
fn check_path(field: &str, p: &str, writable: bool) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(err(field, format!("`{p}` is not an absolute path")));
    }
    if p.split('/').any(|c| c == ".." || c == ".") {
        return Err(err(field, format!("`{p}` contains `.` or `..`")));
    }
    if p.contains("//") {
        return Err(err(
            field,
            format!("`{p}` contains an empty component (`//`)"),
        ));
    }
    if p.trim_end_matches('/').is_empty() {
        return Err(err(field, "`/` itself cannot be written"));
    }
    if writable && (p == "/usr" || p.starts_with("/usr/")) {
        return Err(err(field, format!("`{p}` is under /usr, which is the read-only image (dm-verity); put it under /etc or /var")));
    }
    Ok(())
}

/// The bytes of a resource: `data:` URLs only (remote sources come later), optional gzip,
/// optional hash over the fetched (compressed) bytes.
fn resource(field: &str, r: Resource) -> Result<Vec<u8>, ConfigError> {
    if is_set(&r.http_headers) {
        return Err(err(
            format!("{field}.httpHeaders"),
            "remote sources are not supported yet",
        ));
    }
    let source = r.source.unwrap_or_default();
    let raw = if source.is_empty() {
        Vec::new()
    } else {
        data_url(&format!("{field}.source"), &source)?
    };
    if let Some(h) = r.verification.and_then(|v| v.hash) {
        let (kind, want) = h.split_once('-').ok_or_else(|| {
            err(
                format!("{field}.verification.hash"),
                "expected sha512-<hex> or sha256-<hex>",
            )
        })?;
        let got = match kind {
            "sha512" => hex::encode(Sha512::digest(&raw)),
            "sha256" => hex::encode(Sha256::digest(&raw)),
            _ => {
                return Err(err(
                    format!("{field}.verification.hash"),
                    format!("hash type `{kind}` is not supported (sha512, sha256)"),
                ))
            }
        };
        if got != want.to_ascii_lowercase() {
            return Err(err(
                format!("{field}.verification.hash"),
                format!("the contents have {kind} {got}, not {want}"),
            ));
        }
    }
    match r.compression.as_deref() {
        None | Some("") => Ok(raw),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(MAX_FILE + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    err(
                        format!("{field}.compression"),
                        format!("not gzip data: {e}"),
                    )
                })?;
            if out.len() as u64 > MAX_FILE {
                return Err(err(
                    format!("{field}.compression"),
                    format!("decompresses to more than {MAX_FILE} bytes"),
                ));
            }
            Ok(out)
        }
        Some(other) => Err(err(
            format!("{field}.compression"),
            format!("`{other}` is not supported (gzip)"),
        )),
    }
}

/// Decodes a `data:` URL (RFC 2397): base64 or percent-encoded.
fn data_url(field: &str, url: &str) -> Result<Vec<u8>, ConfigError> {
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url.split(':').next().unwrap_or(url);
        return Err(err(
            field,
            format!(
                "`{scheme}:` sources are not supported yet; inline the contents as a data: URL"
            ),
        ));
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| err(field, "data: URL without `,`"))?;
    if meta.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| err(field, format!("bad base64: {e}")))
    } else {
        let b = data.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = b
                    .get(i + 1..i + 3)
                    .ok_or_else(|| err(field, "truncated %-escape"))?;
                let s = std::str::from_utf8(hex).map_err(|_| err(field, "bad %-escape"))?;
                out.push(
                    u8::from_str_radix(s, 16)
                        .map_err(|_| err(field, format!("bad %-escape `%{s}`")))?,
                );
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(body: &str) -> String {
        format!(r#"{{"ignition":{{"version":"3.4.0"}}{body}}}"#)
    }

    #[test]
    fn supported_fields_become_a_plan() {
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut e, b"compressed\n").expect("gz");
            e.finish().expect("gz")
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&gz);
        let hash = hex::encode(Sha512::digest(&gz));
        let c = cfg(&format!(
            r#","storage":{{"files":[
                {{"path":"/etc/a","contents":{{"source":"data:,hello%20world%0A"}},"mode":384,"user":{{"name":"core"}}}},
                {{"path":"/var/b","contents":{{"source":"data:;base64,{b64}","compression":"gzip","verification":{{"hash":"sha512-{hash}"}}}},"overwrite":true}}],
              "directories":[{{"path":"/var/d","mode":448}}],
              "links":[{{"path":"/etc/l","target":"/etc/a"}}]}},
             "systemd":{{"units":[{{"name":"x.service","enabled":true,"contents":"[Service]\nExecStart=/bin/true\n","dropins":[{{"name":"10.conf","contents":"[Unit]\n"}}]}},{{"name":"y.service","mask":true}}]}},
             "passwd":{{"users":[{{"name":"core","sshAuthorizedKeys":["ssh-ed25519 AAAA x"],"groups":["sudo"]}}],"groups":[{{"name":"ops","gid":2000}}]}}"#
        ));
        let p = parse(c.as_bytes()).expect("valid");
        assert_eq!(p.files[0].contents, b"hello world\n");
        assert_eq!(p.files[0].mode, 0o600);
        assert_eq!(p.files[0].user, Some(Owner::Name("core".into())));
        assert_eq!(p.files[1].contents, b"compressed\n");
        assert!(p.files[1].overwrite);
        assert_eq!(p.directories[0].mode, 0o700);
        assert_eq!(p.links[0].target, "/etc/a");
        assert_eq!(p.units[0].enabled, Some(true));
        assert_eq!(p.units[0].dropins[0].0, "10.conf");
        assert!(p.units[1].mask);
        assert_eq!(p.users[0].ssh_keys.len(), 1);
        assert_eq!(p.groups[0].gid, Some(2000));
        assert_eq!(p.sha256, hex::encode(Sha256::digest(c.as_bytes())));
    }

    #[test]
    fn every_spec_version_from_3_0_is_read() {
        for v in [
            "3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0", "3.5.0", "3.6.0",
        ] {
            let c = format!(
                r#"{{"ignition":{{"version":"{v}"}},"storage":{{"files":[{{"path":"/etc/x","contents":{{"source":"data:,x"}}}}]}}}}"#
            );
            let p = parse(c.as_bytes()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(p.files[0].contents, b"x", "{v}");
        }
    }

    /// Review L4: a line break in `gecos` (or `shell`, `homeDir`) would add a second, uid-0
    /// account to /etc/passwd; `//usr/...` would slip past the /usr check. Both refused.
    #[test]
    fn passwd_field_injection_and_double_slash_paths_are_refused() {
        for (field, user) in [
            (
                "gecos",
                r#""gecos":"Core User\nbackdoor::0:0::/root:/bin/bash\nx""#,
            ),
            ("gecos", r#""gecos":"a:b""#),
            (
                "shell",
                r#""shell":"/bin/sh\nbackdoor::0:0::/root:/bin/bash""#,
            ),
            ("homeDir", r#""homeDir":"/home/x:0""#),
        ] {
            let c = cfg(&format!(
                r#","passwd":{{"users":[{{"name":"core",{user}}}]}}"#
            ));
            let e = parse(c.as_bytes()).expect_err(field).to_string();
            assert!(e.contains(&format!("passwd.users.0.{field}")), "{e}");
        }
        let c =
            cfg(r#","storage":{"files":[{"path":"//usr/lib/x","contents":{"source":"data:,x"}}]}"#);
        let e = parse(c.as_bytes()).expect_err("//usr").to_string();
        assert!(
            e.contains("storage.files.0.path") && e.contains("//"),
            "{e}"
        );
    }

    /// Review L5: every file may decompress to 64 MiB, but not all of them together past the
    /// total (they are held in memory in the initrd).
    #[test]
    fn the_files_of_a_config_are_bounded_together() {
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::Write::write_all(&mut e, &vec![0u8; 60 << 20]).expect("gz");
            e.finish().expect("gz")
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&gz);
        let files: Vec<String> = (0..5)
            .map(|i| {
                format!(
                    r#"{{"path":"/var/f{i}","contents":{{"source":"data:;base64,{b64}","compression":"gzip"}}}}"#
                )
            })
            .collect();
        let c = cfg(&format!(r#","storage":{{"files":[{}]}}"#, files.join(",")));
        let e = parse(c.as_bytes()).expect_err("total").to_string();
        assert!(
            e.contains("storage.files.4.contents") && e.contains("add up to"),
            "{e}"
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("bad json", "{", "$"),
            (
                "unknown version",
                r#"{"ignition":{"version":"4.0.0"}}"#,
                "ignition.version",
            ),
            (
                "unknown field",
                &cfg(r#","storage":{"filez":[]}"#),
                "storage.filez",
            ),
            (
                "under /usr",
                &cfg(r#","storage":{"files":[{"path":"/usr/bin/x"}]}"#),
                "storage.files.0.path",
            ),
            (
                "relative",
                &cfg(r#","storage":{"files":[{"path":"etc/x"}]}"#),
                "storage.files.0.path",
            ),
            (
                "escaping",
                &cfg(r#","storage":{"files":[{"path":"/etc/../../x"}]}"#),
                "storage.files.0.path",
            ),
            (
                "hash mismatch",
                &cfg(
                    r#","storage":{"files":[{"path":"/etc/x","contents":{"source":"data:,a","verification":{"hash":"sha512-00"}}}]}"#,
                ),
                "storage.files.0.contents.verification.hash",
            ),
            (
                "remote source",
                &cfg(
                    r#","storage":{"files":[{"path":"/etc/x","contents":{"source":"https://example.com/x"}}]}"#,
                ),
                "storage.files.0.contents.source",
            ),
            (
                "disks",
                &cfg(r#","storage":{"disks":[{"device":"/dev/vda"}]}"#),
                "storage.disks",
            ),
            (
                "filesystems",
                &cfg(r#","storage":{"filesystems":[{"device":"/dev/vdb","format":"ext4"}]}"#),
                "storage.filesystems",
            ),
            (
                "luks",
                &cfg(r#","storage":{"luks":[{"name":"x","device":"/dev/vdb"}]}"#),
                "storage.luks",
            ),
            (
                "kernel args",
                &cfg(r#","kernelArguments":{"shouldExist":["quiet"]}"#),
                "kernelArguments",
            ),
            (
                "merge",
                &cfg(
                    r#","ignition":{"version":"3.4.0","config":{"merge":[{"source":"data:,{}"}]}}"#,
                ),
                "ignition.config",
            ),
            (
                "append",
                &cfg(r#","storage":{"files":[{"path":"/etc/x","append":[{"source":"data:,a"}]}]}"#),
                "storage.files.0.append",
            ),
            (
                "bad unit",
                &cfg(r#","systemd":{"units":[{"name":"../x.service"}]}"#),
                "systemd.units.0.name",
            ),
            (
                "bad mode",
                &cfg(r#","storage":{"files":[{"path":"/etc/x","mode":99999}]}"#),
                "storage.files.0.mode",
            ),
            (
                "bad user",
                &cfg(r#","passwd":{"users":[{"name":"a:b"}]}"#),
                "passwd.users.0.name",
            ),
            (
                "user removal",
                &cfg(r#","passwd":{"users":[{"name":"a","shouldExist":false}]}"#),
                "passwd.users.0.shouldExist",
            ),
        ];
        for (what, c, field) in cases {
            // "merge" repeats the ignition key: build it by hand.
            let c = if *what == "merge" {
                r#"{"ignition":{"version":"3.4.0","config":{"merge":[{"source":"data:,{}"}]}}}"#
                    .to_string()
            } else {
                c.to_string()
            };
            let e = parse(c.as_bytes()).expect_err(what);
            assert_eq!(e.field, *field, "{what}: {e}");
        }
    }
}
