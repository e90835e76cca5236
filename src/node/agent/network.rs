//! Container networking: when the node has a CNI network config (keel-net writes
//! `/etc/cni/net.d/10-keel-net.conflist`), each container gets its own network namespace,
//! `/run/netns/keel-NAME`, attached by the CNI plugins of that config (bridge + host-local from
//! containernetworking-plugins: an address in this node's overlay subnet), with loopback up.
//! crun joins that namespace; when the container's unit stops, `keel-agent net-detach NAME` runs
//! the plugins' DEL (the address goes back to the pool) and removes the namespace.
//!
//! The CNI protocol (spec 0.4.0/1.0.0) as a runtime sees it: each plugin of the list is a program
//! in `CNI_PATH` named by its `type`, run with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME` and `CNI_PATH` in its environment and its config on stdin; the list's `name` and
//! `cniVersion` are added to each plugin's config, and from the second plugin on, the previous
//! plugin's result as `prevResult`. DEL runs the plugins in reverse order with the ADD result.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where CNI network configs are looked for (relative to the node's root).
pub const CNI_CONF_DIR: &str = "etc/cni/net.d";
/// Where containernetworking-plugins puts the plugins on Debian.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// Where named network namespaces live (the same place `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";
/// The interface name inside the container.
pub const IFNAME: &str = "eth0";
/// The record of an attachment, in the container's bundle.
pub const RECORD: &str = "network.json";
/// Provisioning writes this when the node joins a keel-net overlay (relative to the node's root;
/// `keel cluster init` puts it in each node's Ignition config).
pub const OVERLAY_MARKER: &str = "etc/keel/keel-net.env";

/// The node joins a keel-net overlay but keel-net has not written its CNI config yet (it has
/// no subnet lease so far, e.g. while etcd is still forming): containers must wait for their
/// network instead of starting with loopback only. Returns the marker file that says so.
pub fn network_pending(root: &Path) -> Option<PathBuf> {
    let marker = root.join(OVERLAY_MARKER);
    (marker.is_file() && find_conflist(&root.join(CNI_CONF_DIR)).is_none()).then_some(marker)
}

/// A CNI network config list, as read from its file.
#[derive(Debug, Clone, PartialEq)]
pub struct NetList {
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's config as written (at least `type`).
    pub plugins: Vec<Value>,
}

/// The first `*.conflist` in `dir` by file name (as CNI runtimes choose), if any.
pub fn find_conflist(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    v.sort();
    v.into_iter().next()
}

/// Parses a conflist; errors name the file and the field.
pub fn parse_conflist(file: &Path, text: &str) -> Result<NetList> {
    let at = file.display();
    let v: Value = serde_json::from_str(text).with_context(|| format!("{at}: not valid JSON"))?;
    let field = |k: &str| -> Result<String> {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .with_context(|| format!("{at}: `{k}` is missing or not a string"))
    };
    let name = field("name")?;
    let cni_version = field("cniVersion")?;
    let plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .with_context(|| format!("{at}: `plugins` must be a non-empty list"))?
        .clone();
    for (i, p) in plugins.iter().enumerate() {
        let t = p.get("type").and_then(Value::as_str).unwrap_or("");
        if t.is_empty() || t.contains('/') || t.starts_with('.') {
            bail!("{at}: `plugins[{i}].type` must name a plugin program in {CNI_PATH} (got {t:?})");
        }
    }
    Ok(NetList {
        file: file.to_path_buf(),
        name,
        cni_version,
        plugins,
    })
}

/// The config one plugin of the list reads on stdin.
pub fn plugin_input(list: &NetList, index: usize, prev: Option<&Value>) -> Value {
    let mut conf = list.plugins[index].clone();
    if let Some(o) = conf.as_object_mut() {
        o.insert("name".into(), Value::String(list.name.clone()));
        o.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
        match prev {
            Some(p) => {
                o.insert("prevResult".into(), p.clone());
            }
            None => {
                o.remove("prevResult");
            }
        }
    }
    conf
}

/// The addresses (CIDR notation) a CNI result gives the container.
pub fn result_addresses(result: &Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// What a failing plugin said: CNI's error object (`code`, `msg`, `details`) when it printed
/// one, else its output.
pub fn plugin_error(stdout: &[u8], stderr: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        if let Some(msg) = v.get("msg").and_then(Value::as_str) {
            let code = v.get("code").and_then(Value::as_i64).unwrap_or(0);
            let details = v.get("details").and_then(Value::as_str).unwrap_or("");
            return if details.is_empty() {
                format!("{msg} (CNI error {code})")
            } else {
                format!("{msg}: {details} (CNI error {code})")
            };
        }
    }
    let mut s = String::from_utf8_lossy(stdout).trim().to_string();
    let e = String::from_utf8_lossy(stderr);
    let e = e.trim();
    if !e.is_empty() {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(e.get(e.len().saturating_sub(400)..).unwrap_or(e));
    }
    s
}

/// One plugin call.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub plugin: &'a str,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub input: &'a Value,
}

/// The privileged seam: running plugins and making network namespaces.
pub trait Host {
    /// Runs a plugin; its result (stdout) on success.
    fn invoke(&self, call: &Call) -> Result<Value>;
    /// Creates the named network namespace; its path.
    fn create_netns(&self, name: &str) -> Result<PathBuf>;
    /// Removes a network namespace made by `create_netns` (no error when it is gone).
    fn remove_netns(&self, path: &Path) -> Result<()>;
}

/// What a container's attachment was; kept in the bundle for `net-detach`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub conflist: PathBuf,
    pub netns: PathBuf,
    pub container_id: String,
    pub ifname: String,
    pub addresses: Vec<String>,
    /// The last plugin's ADD result, given back to DEL.
    pub result: Value,
}

fn loopback_input(version: &str) -> Value {
    serde_json::json!({"cniVersion": version, "name": "loopback", "type": "loopback"})
}

/// Attaches container `name` to the node's CNI network, when the node has one. On failure,
/// whatever was set up is undone before the error is returned.
pub fn attach(root: &Path, name: &str, host: &dyn Host) -> Result<Option<Attachment>> {
    let dir = root.join(CNI_CONF_DIR);
    let Some(file) = find_conflist(&dir) else {
        tracing::info!(
            container = name,
            "no CNI network config (*.conflist) in {}: the container gets loopback only",
            dir.display()
        );
        return Ok(None);
    };
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let list = parse_conflist(&file, &text)?;
    let container_id = format!("keel-{name}");
    let netns = host.create_netns(&container_id)?;
    let mut att = Attachment {
        network: list.name.clone(),
        conflist: file.clone(),
        netns,
        container_id,
        ifname: IFNAME.into(),
        addresses: vec![],
        result: Value::Null,
    };
    match add_all(&list, &mut att, host) {
        Ok(()) => Ok(Some(att)),
        Err(e) => {
            if let Err(undo) = detach_with(&list, &att, host) {
                tracing::warn!("undoing a failed attachment: {undo:#}");
            }
            Err(e.context(format!(
                "attaching container {name} to CNI network `{}` ({})",
                list.name,
                file.display()
            )))
        }
    }
}

fn add_all(list: &NetList, att: &mut Attachment, host: &dyn Host) -> Result<()> {
    let lo = loopback_input(&list.cni_version);
    host.invoke(&Call {
        plugin: "loopback",
        command: "ADD",
        container_id: &att.container_id,
        netns: &att.netns,
        ifname: "lo",
        input: &lo,
    })?;
    let mut prev: Option<Value> = None;
    for i in 0..list.plugins.len() {
        let input = plugin_input(list, i, prev.as_ref());
        let plugin = list.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let out = host
            .invoke(&Call {
                plugin,
                command: "ADD",
                container_id: &att.container_id,
                netns: &att.netns,
                ifname: &att.ifname,
                input: &input,
            })
            .with_context(|| format!("`plugins[{i}]` ({plugin}) ADD"))?;
        prev = Some(out);
    }
    att.result = prev.unwrap_or(Value::Null);
    att.addresses = result_addresses(&att.result);
    if att.addresses.is_empty() {
        bail!("the CNI plugins gave the container no address");
    }
    Ok(())
}

/// Runs DEL for every plugin (reverse order) and removes the namespace; tries everything and
/// reports the first failure.
fn detach_with(list: &NetList, att: &Attachment, host: &dyn Host) -> Result<()> {
    let mut first: Option<anyhow::Error> = None;
    let prev = (!att.result.is_null()).then_some(&att.result);
    for i in (0..list.plugins.len()).rev() {
        let input = plugin_input(list, i, prev);
        let plugin = list.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Err(e) = host.invoke(&Call {
            plugin,
            command: "DEL",
            container_id: &att.container_id,
            netns: &att.netns,
            ifname: &att.ifname,
            input: &input,
        }) {
            first.get_or_insert(e.context(format!("`plugins[{i}]` ({plugin}) DEL")));
        }
    }
    let lo = loopback_input(&list.cni_version);
    let _ = host.invoke(&Call {
        plugin: "loopback",
        command: "DEL",
        container_id: &att.container_id,
        netns: &att.netns,
        ifname: "lo",
        input: &lo,
    });
    if let Err(e) = host.remove_netns(&att.netns) {
        first.get_or_insert(e);
    }
    match first {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Undoes an attachment recorded at its ADD. The network config is read again from the file the
/// attachment used; when it is gone, the DEL runs with the plugins recorded in no file, so only
/// the namespace is removed (the address stays reserved until the node reboots).
pub fn detach(att: &Attachment, host: &dyn Host) -> Result<()> {
    let list = fs::read_to_string(&att.conflist)
        .map_err(anyhow::Error::from)
        .and_then(|t| parse_conflist(&att.conflist, &t));
    match list {
        Ok(list) => detach_with(&list, att, host),
        Err(e) => {
            host.remove_netns(&att.netns)?;
            Err(e.context(format!(
                "the CNI config of {} is unreadable; removed its namespace only",
                att.container_id
            )))
        }
    }
}

/// Reads the attachment record of a bundle, if the container was attached.
pub fn read_record(bundle: &Path) -> Result<Option<Attachment>> {
    let p = bundle.join(RECORD);
    match fs::read(&p) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The real host: plugins from [`CNI_PATH`], namespaces under [`NETNS_DIR`].
pub struct RealHost;

impl Host for RealHost {
    fn invoke(&self, call: &Call) -> Result<Value> {
        let program = Path::new(CNI_PATH).join(call.plugin);
        tracing::debug!(plugin = %program.display(), command = call.command, netns = %call.netns.display(), "CNI");
        let mut child = Command::new(&program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container_id)
            .env("CNI_NETNS", call.netns)
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "running CNI plugin {} (is containernetworking-plugins installed?)",
                    program.display()
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(call.input.to_string().as_bytes())
                .with_context(|| format!("writing the config to {}", program.display()))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {}: {}",
                program.display(),
                call.command,
                plugin_error(&out.stdout, &out.stderr)
            );
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{} {}: result is not JSON", program.display(), call.command))
    }

    fn create_netns(&self, name: &str) -> Result<PathBuf> {
        let stale = Path::new(NETNS_DIR).join(name);
        if stale.exists() {
            // Left by a container whose detach never ran (the node lost power mid-stop).
            tracing::warn!(netns = %stale.display(), "removing a stale network namespace");
            netns::remove(&stale)?;
        }
        netns::create(Path::new(NETNS_DIR), name)
    }

    fn remove_netns(&self, path: &Path) -> Result<()> {
        netns::remove(path)
    }
}

/// Named network namespaces, made the way `ip netns add` makes them: a file under /run/netns
/// with the namespace bind-mounted on it, in a directory that is a shared mount so other mount
/// namespaces see it.
mod netns {
    use anyhow::{Context, Result};
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    use std::fs;
    use std::path::{Path, PathBuf};

    fn shared_dir(dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let shared = || {
            mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
        };
        if shared().is_ok() {
            return Ok(());
        }
        // Not a mount point yet: bind it onto itself, then make it shared.
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} onto itself", dir.display()))?;
        shared().with_context(|| format!("making {} a shared mount", dir.display()))
    }

    pub fn create(dir: &Path, name: &str) -> Result<PathBuf> {
        shared_dir(dir)?;
        let path = dir.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // unshare(CLONE_NEWNET) moves only the calling thread: do it in a thread of its own and
        // pin the new namespace on the file before the thread ends.
        let target = path.clone();
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
            mount(
                Some(own.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {own} on {}", target.display()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread making {} panicked", path.display()))?;
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e.context(format!("creating network namespace {}", path.display())));
        }
        Ok(path)
    }

    pub fn remove(path: &Path) -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        // EINVAL: not mounted (a file left by a failed create).
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e).with_context(|| format!("unmounting {}", path.display())),
        }
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn list() -> NetList {
        parse_conflist(
            Path::new("/etc/cni/net.d/10-test.conflist"),
            r#"{"cniVersion":"0.4.0","name":"keel-net","plugins":[
                {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .expect("parses")
    }

    #[test]
    fn conflist_errors_name_file_and_field() {
        let f = Path::new("/x/n.conflist");
        for (case, text, want) in [
            ("not json", "{", "/x/n.conflist: not valid JSON"),
            (
                "no name",
                r#"{"cniVersion":"0.4.0","plugins":[{"type":"bridge"}]}"#,
                "`name`",
            ),
            (
                "no version",
                r#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
                "`cniVersion`",
            ),
            (
                "no plugins",
                r#"{"name":"n","cniVersion":"0.4.0","plugins":[]}"#,
                "`plugins` must be",
            ),
            (
                "no type",
                r#"{"name":"n","cniVersion":"0.4.0","plugins":[{"bridge":"b"}]}"#,
                "`plugins[0].type`",
            ),
            (
                "path type",
                r#"{"name":"n","cniVersion":"0.4.0","plugins":[{"type":"../../bin/sh"}]}"#,
                "`plugins[0].type`",
            ),
        ] {
            let e = format!("{:#}", parse_conflist(f, text).expect_err(case));
            assert!(e.contains(want), "{case}: {e}");
            assert!(e.contains("/x/n.conflist"), "{case}: {e}");
        }
    }

    #[test]
    fn plugin_inputs_carry_name_version_and_previous_result() {
        let l = list();
        let first = plugin_input(&l, 0, None);
        assert_eq!(first["name"], "keel-net");
        assert_eq!(first["cniVersion"], "0.4.0");
        assert_eq!(first["bridge"], "cni0");
        assert!(first.get("prevResult").is_none());
        let prev = serde_json::json!({"ips":[{"address":"10.5.3.2/24"}]});
        let second = plugin_input(&l, 1, Some(&prev));
        assert_eq!(second["type"], "portmap");
        assert_eq!(second["prevResult"], prev);
        assert_eq!(result_addresses(&prev), vec!["10.5.3.2/24".to_string()]);
        assert!(result_addresses(&Value::Null).is_empty());
    }

    #[test]
    fn plugin_errors_are_readable() {
        assert_eq!(
            plugin_error(
                br#"{"code":11,"msg":"failed to allocate","details":"range full"}"#,
                b""
            ),
            "failed to allocate: range full (CNI error 11)"
        );
        assert_eq!(plugin_error(b"", b"boom\n"), "boom");
    }

    /// Records calls; fails the plugin named in `fail`.
    #[derive(Default)]
    struct FakeHost {
        calls: RefCell<Vec<String>>,
        fail: Option<&'static str>,
        namespaces: RefCell<Vec<PathBuf>>,
    }
    impl Host for FakeHost {
        fn invoke(&self, call: &Call) -> Result<Value> {
            self.calls.borrow_mut().push(format!(
                "{} {} {} prev={}",
                call.command,
                call.plugin,
                call.ifname,
                call.input.get("prevResult").is_some()
            ));
            if self.fail == Some(call.plugin) && call.command == "ADD" {
                bail!("{} refused", call.plugin);
            }
            Ok(match call.plugin {
                "bridge" => {
                    serde_json::json!({"ips":[{"address":"10.5.3.2/24","gateway":"10.5.3.1"}]})
                }
                "portmap" => call.input["prevResult"].clone(),
                _ => Value::Null,
            })
        }
        fn create_netns(&self, name: &str) -> Result<PathBuf> {
            let p = PathBuf::from(format!("/fake/{name}"));
            self.namespaces.borrow_mut().push(p.clone());
            Ok(p)
        }
        fn remove_netns(&self, path: &Path) -> Result<()> {
            self.namespaces.borrow_mut().retain(|p| p != path);
            Ok(())
        }
    }

    fn root_with_conflist() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let d = t.path().join(CNI_CONF_DIR);
        fs::create_dir_all(&d).expect("dir");
        fs::write(
            d.join("10-keel-net.conflist"),
            r#"{"cniVersion":"0.4.0","name":"keel-net","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .expect("write");
        t
    }

    #[test]
    fn attach_runs_the_chain_and_detach_reverses_it() {
        let t = root_with_conflist();
        let host = FakeHost::default();
        let att = attach(t.path(), "web", &host)
            .expect("attaches")
            .expect("a network");
        assert_eq!(att.addresses, vec!["10.5.3.2/24".to_string()]);
        assert_eq!(att.netns, PathBuf::from("/fake/keel-web"));
        assert_eq!(
            *host.calls.borrow(),
            vec![
                "ADD loopback lo prev=false",
                "ADD bridge eth0 prev=false",
                "ADD portmap eth0 prev=true"
            ]
        );
        host.calls.borrow_mut().clear();
        detach(&att, &host).expect("detaches");
        assert_eq!(
            *host.calls.borrow(),
            vec![
                "DEL portmap eth0 prev=true",
                "DEL bridge eth0 prev=true",
                "DEL loopback lo prev=false"
            ]
        );
        assert!(host.namespaces.borrow().is_empty());
    }

    #[test]
    fn a_failed_attach_undoes_itself() {
        let t = root_with_conflist();
        let host = FakeHost {
            fail: Some("portmap"),
            ..Default::default()
        };
        let e = format!("{:#}", attach(t.path(), "web", &host).expect_err("fails"));
        assert!(e.contains("`plugins[1]` (portmap) ADD"), "{e}");
        assert!(e.contains("10-keel-net.conflist"), "{e}");
        let calls = host.calls.borrow();
        assert!(
            calls.contains(&"DEL bridge eth0 prev=false".to_string()),
            "{calls:?}"
        );
        assert!(host.namespaces.borrow().is_empty(), "namespace removed");
    }

    #[test]
    fn no_config_means_no_attachment() {
        let t = tempfile::tempdir().expect("tmp");
        let host = FakeHost::default();
        assert!(attach(t.path(), "web", &host).expect("ok").is_none());
        assert!(host.calls.borrow().is_empty());
    }
}
