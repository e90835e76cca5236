//! Fakes of keel-agent's seams (machine, systemd, CNI) and a node root with a policy and a
//! signed image, for the unit tests of the agent's modules.

use super::containers::Machine;
use super::network;
use super::systemd::{UnitSpec, UnitState, Units};
use crate::container::{policy, signature};
use anyhow::{bail, Context, Result};
use std::cell::{Cell, RefCell};
use std::fs;
use std::path::{Path, PathBuf};

pub struct FakeMachine {
    pub ek: Option<String>,
    pub trusted: bool,
}
impl Machine for FakeMachine {
    fn ek_sha256(&self) -> Result<String> {
        self.ek.clone().context("no TPM")
    }
    fn boot_trusted(&self) -> Result<(bool, Vec<String>)> {
        Ok((
            self.trusted,
            if self.trusted {
                vec![]
            } else {
                vec!["PCR 11 unsigned".into()]
            },
        ))
    }
}

#[derive(Default)]
pub struct FakeUnits {
    pub started: RefCell<Vec<UnitSpec>>,
    /// Starts fail (the job failed) while this is set.
    pub fail: Cell<bool>,
    /// Starts asked for, failed or not.
    pub attempts: Cell<u32>,
}
impl Units for FakeUnits {
    fn start(&self, spec: &UnitSpec) -> Result<()> {
        self.attempts.set(self.attempts.get() + 1);
        if self.fail.get() {
            bail!("job failed");
        }
        self.started.borrow_mut().push(spec.clone());
        Ok(())
    }
    fn stop(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<UnitState>> {
        Ok(vec![])
    }
    fn state(&self, _: &str) -> Result<Option<UnitState>> {
        Ok(None)
    }
}

/// A node without a CNI config never reaches the network seam.
pub struct NoNet;
impl network::Host for NoNet {
    fn invoke(&self, call: &network::Call) -> Result<serde_json::Value> {
        panic!("no CNI config, yet {} was invoked", call.plugin)
    }
    fn create_netns(&self, name: &str) -> Result<PathBuf> {
        panic!("no CNI config, yet netns {name} was made")
    }
    fn remove_netns(&self, _: &Path) -> Result<()> {
        Ok(())
    }
}

/// A CNI network that hands out one address; remembers the namespaces that exist.
#[derive(Default)]
pub struct FakeNet {
    pub namespaces: RefCell<Vec<PathBuf>>,
    pub deleted: RefCell<usize>,
}
impl network::Host for FakeNet {
    fn invoke(&self, call: &network::Call) -> Result<serde_json::Value> {
        if call.command == "DEL" && call.plugin == "bridge" {
            *self.deleted.borrow_mut() += 1;
        }
        Ok(serde_json::json!({"ips": [{"address": "10.5.7.2/24"}]}))
    }
    fn create_netns(&self, name: &str) -> Result<PathBuf> {
        let p = PathBuf::from(format!("/run/netns/{name}"));
        self.namespaces.borrow_mut().push(p.clone());
        Ok(p)
    }
    fn remove_netns(&self, path: &Path) -> Result<()> {
        self.namespaces.borrow_mut().retain(|p| p != path);
        Ok(())
    }
}

/// Gives the node root the CNI network config keel-net would write (one bridge plugin).
pub fn write_conflist(root: &Path) {
    let conf = root.join(network::CNI_CONF_DIR);
    fs::create_dir_all(&conf).expect("dir");
    fs::write(
        conf.join("10-keel-net.conflist"),
        r#"{"cniVersion":"0.4.0","name":"keel-net","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("conflist");
}

/// A node root with a policy trusting a new key, and an image signed by it for `keel/hello`.
pub fn node(
    require_boot: bool,
) -> (
    tempfile::TempDir,
    openssl::pkey::PKey<openssl::pkey::Private>,
    PathBuf,
) {
    node_signed_for(require_boot, "keel/hello")
}

/// [`node`], the image signed for `reference`.
pub fn node_signed_for(
    require_boot: bool,
    reference: &str,
) -> (
    tempfile::TempDir,
    openssl::pkey::PKey<openssl::pkey::Private>,
    PathBuf,
) {
    let t = tempfile::tempdir().expect("tmp");
    let k = signature::generate_key().expect("key");
    let pdir = t.path().join(policy::POLICY_DIR);
    fs::create_dir_all(&pdir).expect("dir");
    fs::write(
        pdir.join("ops.pub.pem"),
        k.public_key_to_pem().expect("pem"),
    )
    .expect("key");
    let p = policy::Policy {
        keys: vec!["ops.pub.pem".into()],
        require_trusted_boot: require_boot,
        require_enrolled_machines: false,
        cluster: "test".into(),
        allow_root: false,
    };
    fs::write(
        pdir.join(policy::POLICY_FILE),
        serde_json::to_vec(&p).expect("json"),
    )
    .expect("policy");
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("bin")).expect("tree");
    fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hi\n").expect("file");
    let img = t.path().join("hello");
    crate::container::build::from_tree(&tree, &img, &["/bin/hello".into()], &[]).expect("build");
    crate::container::build::sign(&img, &k, reference).expect("sign");
    (t, k, img)
}
