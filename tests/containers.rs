#![allow(clippy::expect_used, clippy::unwrap_used)]
//! keel's container signatures against the real cosign (Debian trixie's, in keel's tools tree),
//! both ways: an image signed by `keel container sign` passes `cosign verify-blob`, and a
//! signature made by `cosign sign-blob` over `keel container payload` is accepted by
//! `keel container verify` after `keel container attach` — and refused with another key.

mod common;
use common::{keel, succeeded as ok};
use keel::container::oci::Layout;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tools() -> PathBuf {
    PathBuf::from(
        ok(
            keel().arg("__tools-path").output().expect("keel"),
            "keel __tools-path",
        )
        .trim(),
    )
}

fn cosign(tools: &Path, dir: &Path, args: &[&str]) -> Output {
    keel()
        .args(["__sandbox", "--root"])
        .arg(tools)
        .arg("--bind")
        .arg(dir)
        .args(["--env", "COSIGN_PASSWORD=", "--", "cosign"])
        .args(args)
        .output()
        .expect("run cosign in the tools tree")
}

/// A one-layer image of a small tree.
fn image(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    let img = dir.join("img");
    ok(
        keel()
            .args(["container", "build", "--from-tree"])
            .arg(&tree)
            .arg("--out")
            .arg(&img)
            .args(["--", "/bin/hello"])
            .output()
            .unwrap(),
        "keel container build",
    );
    img
}

#[test]
fn keel_signatures_verify_with_cosign_and_cosign_signatures_with_keel() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let tools = tools();
    let img = image(d);

    // keel signs, cosign verifies.
    let key = keel::container::signature::generate_key().unwrap();
    fs::write(d.join("keel.key"), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    fs::write(d.join("keel.pub"), key.public_key_to_pem().unwrap()).unwrap();
    ok(
        keel()
            .args(["container", "sign"])
            .arg(&img)
            .arg("--key")
            .arg(d.join("keel.key"))
            .output()
            .unwrap(),
        "keel container sign",
    );
    let layout = Layout::open(&img).unwrap();
    let digest = layout.image_descriptor().unwrap().digest;
    let sigs = layout.signatures(&digest).unwrap();
    assert_eq!(sigs.len(), 1);
    fs::write(d.join("payload.json"), &sigs[0].0).unwrap();
    fs::write(d.join("payload.sig"), &sigs[0].1).unwrap();
    let p = |n: &str| d.join(n).display().to_string();
    let verify = |keyfile: &str| {
        cosign(
            &tools,
            d,
            &[
                "verify-blob",
                "--insecure-ignore-tlog=true",
                "--key",
                &p(keyfile),
                "--signature",
                &p("payload.sig"),
                &p("payload.json"),
            ],
        )
    };
    ok(verify("keel.pub"), "cosign verify-blob of keel's signature");

    // cosign signs keel's payload, keel attaches and verifies.
    ok(
        cosign(
            &tools,
            d,
            &["generate-key-pair", "--output-key-prefix", &p("cosign")],
        ),
        "cosign generate-key-pair",
    );
    let payload = ok(
        keel()
            .args(["container", "payload"])
            .arg(&img)
            .output()
            .unwrap(),
        "keel container payload",
    );
    fs::write(d.join("payload2.json"), &payload).unwrap();
    // Negative control: cosign refuses keel's signature with a key that did not make it.
    assert!(
        !verify("cosign.pub").status.success(),
        "cosign accepted a signature by another key"
    );
    let sig = ok(
        cosign(
            &tools,
            d,
            &[
                "sign-blob",
                "--yes",
                "--tlog-upload=false",
                "--key",
                &p("cosign.key"),
                &p("payload2.json"),
            ],
        ),
        "cosign sign-blob",
    );
    fs::write(d.join("cosign.sig"), sig.trim()).unwrap();
    let unsigned = d.join("img2");
    ok(
        Command::new("cp")
            .arg("-r")
            .arg(&img)
            .arg(&unsigned)
            .output()
            .unwrap(),
        "cp",
    );
    // Drop keel's signature from the copy: only cosign's remains.
    let l2 = Layout::open(&unsigned).unwrap();
    let mut idx = l2.index().unwrap();
    idx.manifests.retain(|m| m.digest == digest);
    l2.write_index(&idx).unwrap();
    ok(
        keel()
            .args(["container", "attach"])
            .arg(&unsigned)
            .arg("--payload")
            .arg(d.join("payload2.json"))
            .arg("--signature")
            .arg(d.join("cosign.sig"))
            .output()
            .unwrap(),
        "keel container attach",
    );
    let out = ok(
        keel()
            .args(["container", "verify"])
            .arg(&unsigned)
            .arg("--key")
            .arg(d.join("cosign.pub"))
            .output()
            .unwrap(),
        "keel container verify with cosign.pub",
    );
    assert!(out.contains(&digest), "{out}");
    // The same image does not verify with keel's key: only cosign's signature is in it.
    let refused = keel()
        .args(["container", "verify"])
        .arg(&unsigned)
        .arg("--key")
        .arg(d.join("keel.pub"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("no trusted key verifies the signature"),
        "{err}"
    );
}
