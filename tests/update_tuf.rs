//! The update repository attacked from the mirror's side: a repository `keel publish` wrote
//! (its code, its keys), read by the node's own check code over file://, then changed the way a
//! lying mirror would. Each attack must be refused with a message naming it, and nothing of a
//! refused target may be left behind.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use keel::host::publish::{keys, repo};
use keel::node::update::check;
use keel::node::update::node::Node;
use keel::node::update::state::Record;
use keel::update::release::Release;
use keel::update::tuf::{self, Address, TufError};
use std::fs;
use std::path::{Path, PathBuf};

struct World {
    _t: tempfile::TempDir,
    keys: PathBuf,
    repo: PathBuf,
    node: PathBuf,
    files: PathBuf,
}

fn world() -> World {
    let t = tempfile::tempdir().expect("tempdir");
    let keys_dir = t.path().join("keys");
    fs::create_dir(&keys_dir).expect("mkdir");
    assert!(keys::ensure(&keys_dir).expect("tuf keys"));
    let node = t.path().join("node");
    fs::create_dir_all(node.join("usr/lib/keel/update")).expect("mkdir");
    fs::copy(
        keys::root_json(&keys::tuf_dir(&keys_dir)),
        node.join("usr/lib/keel/update/root.json"),
    )
    .expect("root");
    let repo_dir = t.path().join("repo");
    fs::write(
        node.join("usr/lib/keel/update/config.toml"),
        format!(
            "repository = \"{}\"\n",
            Address::from_dir(&repo_dir).expect("address").base
        ),
    )
    .expect("config");
    fs::write(
        node.join("usr/lib/os-release"),
        "ID=debian\nIMAGE_ID=img\nIMAGE_VERSION=0.1.0\n",
    )
    .expect("os-release");
    let files = t.path().join("files");
    fs::create_dir(&files).expect("mkdir");
    World {
        keys: keys_dir,
        repo: repo_dir,
        node,
        files,
        _t: t,
    }
}

impl World {
    fn tuf(&self) -> PathBuf {
        keys::tuf_dir(&self.keys)
    }

    fn publish(&self, version: &str, life: &repo::Lifetimes) {
        let mut files = Vec::new();
        for (kind, len) in [
            ("usr", 300_000),
            ("verity", 4096),
            ("efi", 1000),
            ("manifest.json", 10),
        ] {
            let name = format!("img_{version}.{kind}");
            let path = self.files.join(&name);
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + version.len()) as u8).collect();
            fs::write(&path, bytes).expect("write");
            files.push((name, path));
        }
        let rel = repo::ReleaseFiles {
            image: "img".into(),
            release: Release {
                version: version.into(),
                root_hash: "a".repeat(64),
                usr: format!("img_{version}.usr"),
                verity: format!("img_{version}.verity"),
                uki: format!("img_{version}.efi"),
                manifest: format!("img_{version}.manifest.json"),
                pcr_initrd_key: "b".repeat(64),
            },
            files,
        };
        rt().block_on(repo::add_release(&self.repo, &self.tuf(), &rel, life))
            .expect("publish");
    }

    fn check(&self) -> anyhow::Result<check::Found> {
        let node = Node::new(&self.node);
        let address = check::address(&node, None)?;
        let running = node.running()?;
        rt().block_on(check::check(
            &node,
            &address,
            &running,
            &Record::default(),
            None,
        ))
    }

    fn metadata(&self, name: &str) -> PathBuf {
        self.repo.join("metadata").join(name)
    }

    /// The stored file of a target (`targets/SHA256.NAME`).
    fn target_file(&self, name: &str) -> PathBuf {
        fs::read_dir(self.repo.join("targets"))
            .expect("targets")
            .map(|e| e.expect("entry").path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().ends_with(&format!(".{name}")))
            })
            .expect("target stored")
    }
}

fn rt() -> tokio::runtime::Runtime {
    tuf::runtime().expect("runtime")
}

fn refusal(r: anyhow::Result<check::Found>) -> TufError {
    let e = r.err().expect("must be refused");
    let text = format!("{e:#}");
    match e.downcast::<TufError>() {
        Ok(t) => t,
        Err(other) => panic!("not a repository refusal: {text} ({other})"),
    }
}

#[test]
fn a_published_release_is_offered_and_its_bytes_verified() {
    let w = world();
    w.publish("0.1.0", &repo::Lifetimes::default());
    w.publish("0.2.0", &repo::Lifetimes::default());
    let found = w.check().expect("check");
    let offered = found.choice.expect("a release is offered");
    assert_eq!(offered.version, "0.2.0");
    let dest = w.files.join("downloaded.usr");
    let n = rt()
        .block_on(tuf::save(&found.repo, &offered.usr, &dest, |_| {}))
        .expect("download");
    assert_eq!(n, 300_000);
    assert_eq!(
        fs::read(&dest).expect("read"),
        fs::read(w.files.join("img_0.2.0.usr")).expect("read")
    );
}

#[test]
fn a_tampered_or_truncated_target_is_refused_and_nothing_is_kept() {
    let w = world();
    w.publish("0.2.0", &repo::Lifetimes::default());
    let stored = w.target_file("img_0.2.0.usr");
    let mut bytes = fs::read(&stored).expect("read");
    bytes[1234] ^= 0x40;
    fs::write(&stored, &bytes).expect("tamper");
    let found = w.check().expect("metadata is intact");
    let dest = w.files.join("staged.usr");
    let e = rt()
        .block_on(tuf::save(&found.repo, "img_0.2.0.usr", &dest, |_| {}))
        .expect_err("tampered target");
    assert!(matches!(e, TufError::Target { .. }), "{e}");
    assert!(e.to_string().contains("img_0.2.0.usr"), "{e}");
    assert!(!dest.exists() && !dest.with_extension("part").exists());

    bytes[1234] ^= 0x40;
    fs::write(&stored, &bytes[..bytes.len() - 10]).expect("truncate");
    let e = rt()
        .block_on(tuf::save(&found.repo, "img_0.2.0.usr", &dest, |_| {}))
        .expect_err("truncated target");
    assert!(matches!(e, TufError::Target { .. }), "{e}");
    assert!(!dest.exists() && !dest.with_extension("part").exists());
}

#[test]
fn replayed_older_metadata_is_refused() {
    let w = world();
    w.publish("0.2.0", &repo::Lifetimes::default());
    let old_timestamp = fs::read(w.metadata("timestamp.json")).expect("read");
    w.publish("0.3.0", &repo::Lifetimes::default());
    // The node sees the newer repository once, and remembers it.
    assert_eq!(
        w.check().expect("check").choice.expect("offer").version,
        "0.3.0"
    );
    // The mirror now serves the old (validly signed, unexpired) timestamp again.
    fs::write(w.metadata("timestamp.json"), old_timestamp).expect("replay");
    match refusal(w.check()) {
        TufError::Older {
            role,
            trusted,
            offered,
        } => {
            assert_eq!(role, "timestamp");
            assert!(offered < trusted);
        }
        other => panic!("wrong refusal: {other}"),
    }
}

#[test]
fn expired_metadata_is_refused_naming_the_role() {
    let w = world();
    let life = repo::Lifetimes {
        timestamp: jiff::SignedDuration::from_hours(-1),
        ..repo::Lifetimes::default()
    };
    w.publish("0.2.0", &life);
    let e = refusal(w.check());
    assert!(
        matches!(&e, TufError::Expired { role, .. } if role == "timestamp"),
        "{e}"
    );
    assert!(e.to_string().contains("keel publish refresh"), "{e}");
    // The publisher's refresh makes it acceptable again.
    rt().block_on(repo::refresh(
        &w.repo,
        &w.tuf(),
        &repo::Lifetimes::default(),
    ))
    .expect("refresh");
    assert_eq!(
        w.check().expect("check").choice.expect("offer").version,
        "0.2.0"
    );
}

#[test]
fn targets_from_another_publish_are_refused() {
    let w = world();
    w.publish("0.2.0", &repo::Lifetimes::default());
    // A second repository, same keys, other contents, same metadata versions.
    let other = world_with_keys(&w);
    other.publish("0.9.0", &repo::Lifetimes::default());
    fs::copy(
        other.metadata("1.targets.json"),
        w.metadata("1.targets.json"),
    )
    .expect("mix");
    let e = refusal(w.check());
    assert!(matches!(e, TufError::Metadata(_)), "{e}");
    assert!(e.to_string().contains("1.targets.json"), "{e}");
}

fn world_with_keys(w: &World) -> World {
    let o = world();
    fs::remove_dir_all(o.tuf()).expect("rm");
    copy_dir(&w.tuf(), &o.tuf());
    fs::copy(
        keys::root_json(&w.tuf()),
        o.node.join("usr/lib/keel/update/root.json"),
    )
    .expect("root");
    o
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        fs::copy(e.path(), &dest).expect("copy");
    }
}

#[test]
fn root_rotation_is_followed_and_the_old_root_key_alone_is_refused() {
    let w = world();
    w.publish("0.2.0", &repo::Lifetimes::default());
    assert!(w.check().is_ok());
    let old_root_key =
        fs::read(keys::key_file(&w.tuf(), tough::schema::RoleType::Root)).expect("read");
    // The timestamp key, then the root key itself, are replaced: the node, which trusts root 1,
    // follows root 2 and 3.
    rt().block_on(repo::rotate(
        &w.repo,
        &w.tuf(),
        tough::schema::RoleType::Timestamp,
        &repo::Lifetimes::default(),
    ))
    .expect("rotate timestamp");
    rt().block_on(repo::rotate(
        &w.repo,
        &w.tuf(),
        tough::schema::RoleType::Root,
        &repo::Lifetimes::default(),
    ))
    .expect("rotate root");
    let found = w.check().expect("rotations followed");
    assert_eq!(found.repo.root().signed.version.get(), 3);
    // A mirror that later hides the new roots does not take the node back to root 1 (whose
    // retired timestamp key would then be trusted again): the node starts from the root it
    // stored.
    let hidden = w.files.join("hidden");
    fs::create_dir_all(&hidden).expect("mkdir");
    for n in [2, 3] {
        let name = format!("{n}.root.json");
        fs::rename(w.metadata(&name), hidden.join(&name)).expect("hide");
    }
    let found = w.check().expect("the stored root is the starting point");
    assert_eq!(found.repo.root().signed.version.get(), 3);
    for n in [2, 3] {
        let name = format!("{n}.root.json");
        fs::rename(hidden.join(&name), w.metadata(&name)).expect("restore");
    }
    // Whoever holds only the retired root key signs a root 4 of their own: refused.
    let thief = tempfile::tempdir().expect("tempdir");
    copy_dir(&w.tuf(), thief.path());
    let root_key = keys::key_file(thief.path(), tough::schema::RoleType::Root);
    fs::remove_file(&root_key).expect("rm");
    fs::write(&root_key, old_root_key).expect("old key");
    fs::set_permissions(
        &root_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let mut forged = keys::root_for(thief.path(), 4).expect("root");
    forged.expires = keys::days_from_now(30).expect("expiry");
    let bytes = rt()
        .block_on(keys::sign_root(forged, thief.path(), None))
        .expect("sign");
    fs::write(w.metadata("4.root.json"), bytes).expect("plant");
    let e = refusal(w.check());
    assert!(matches!(e, TufError::Metadata(_)), "{e}");
}
