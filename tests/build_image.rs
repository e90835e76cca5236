#![allow(clippy::expect_used, clippy::unwrap_used)]
//! Builds `images/minimal.toml` for real (mmdebstrap, tools tree, OSTree, repart) and checks what
//! an operator would: the partition table, the verity tree against the manifest's root hash, the
//! UKI command line, reproducibility, the build history, and that a failed build leaves earlier
//! outputs alone.
//!
//! Needs root, mmdebstrap and fdisk (sfdisk) on the host and the Debian mirror; a missing tool
//! fails the test.

mod common;
use common::{keel, succeeded as ok};
use serde_json::Value;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn build(def: &Path, out: &Path, extra: &[&str]) -> Value {
    let o = keel()
        .current_dir(project())
        .arg("build")
        .arg(def)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .args(extra)
        .output()
        .expect("run keel build");
    serde_json::from_str(&ok(o, &format!("keel build {}", def.display()))).expect("manifest JSON")
}

fn require_host(program: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is required for this test: apt-get install {package}"
    );
}

/// Copies `len` bytes at `offset` of `src` into a new file.
fn extract(src: &Path, offset: u64, len: u64, dst: &Path) {
    let mut f = fs::File::open(src).expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut out = fs::File::create(dst).expect("create");
    std::io::copy(&mut f.take(len), &mut out).expect("copy");
}

fn tools_tree() -> PathBuf {
    // The tools tree of this keel (bootstrapped when missing), as keel itself resolves it.
    let out = keel()
        .arg("__tools-path")
        .output()
        .expect("run keel __tools-path");
    PathBuf::from(ok(out, "keel __tools-path").trim())
}

/// Runs a program of the tools tree with `dir` visible inside.
fn in_tools<I, S>(dir: &Path, argv: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    keel()
        .args(["__sandbox", "--root"])
        .arg(tools_tree())
        .arg("--bind")
        .arg(dir)
        .arg("--")
        .args(argv)
        .output()
        .expect("run a tool in the tools tree")
}

fn veritysetup_verify(dir: &Path, data: &Path, hash: &Path, root_hash: &str) -> Output {
    in_tools(
        dir,
        [
            "veritysetup".as_ref(),
            "verify".as_ref(),
            data.as_os_str(),
            hash.as_os_str(),
            root_hash.as_ref(),
        ],
    )
}

/// `(phase, value)` pairs from a JSON array of per-phase PCR values.
fn phase_values(list: &Value, value_key: &str) -> Vec<(String, String)> {
    list.as_array()
        .expect("array of phases")
        .iter()
        .map(|e| {
            (
                e["phase"].as_str().expect("phase").to_string(),
                e[value_key].as_str().expect("value").to_string(),
            )
        })
        .collect()
}

#[test]
fn build_minimal_image_end_to_end() {
    require_host("mmdebstrap", "mmdebstrap");
    require_host("sfdisk", "fdisk");
    assert!(
        nix_is_root(),
        "keel build needs root (mount namespaces, chroot, ownership in the tree)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out1 = tmp.path().join("one");
    let out2 = tmp.path().join("two");
    let def = project().join("images/minimal.toml");

    // 1. A build produces the artifacts the manifest lists.
    let m1 = build(&def, &out1, &[]);
    for f in [
        "minimal.raw",
        "minimal.qcow2",
        "minimal.efi",
        "manifest.json",
    ] {
        assert!(out1.join(f).is_file(), "{f} missing");
    }
    let root_hash = m1["usr_root_hash"].as_str().expect("root hash").to_string();
    assert_eq!(root_hash.len(), 64);
    for a in m1["artifacts"].as_array().expect("artifacts") {
        let file = out1.join(a["file"].as_str().expect("file"));
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        let mut f = fs::File::open(&file).expect("open");
        std::io::copy(&mut f, &mut h).expect("hash");
        assert_eq!(
            hex::encode(sha2::Digest::finalize(h)),
            a["sha256"].as_str().expect("sha"),
            "{}",
            file.display()
        );
    }
    assert!(m1["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .any(|p| p["name"] == "systemd"));

    // 2. sfdisk sees ESP, two usr and two usr-verity partitions, one pair labelled _empty.
    let table: Value = serde_json::from_str(&ok(
        Command::new("sfdisk")
            .arg("-J")
            .arg(out1.join("minimal.raw"))
            .output()
            .expect("sfdisk"),
        "sfdisk -J",
    ))
    .expect("json");
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .clone();
    let types: Vec<String> = parts
        .iter()
        .map(|p| p["type"].as_str().unwrap_or("").to_ascii_lowercase())
        .collect();
    assert_eq!(
        types,
        vec![
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            "8484680c-9521-48c6-9c11-b0720656f69e",
            "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
            "8484680c-9521-48c6-9c11-b0720656f69e",
            "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
        ]
    );
    let names: Vec<&str> = parts
        .iter()
        .map(|p| p["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(&names[3..], &["_empty", "_empty"]);
    assert_eq!(table["partitiontable"]["sectorsize"], 512);

    // 3. veritysetup verify of slot A against the manifest's root hash succeeds, and fails once a
    //    byte of the data is changed (so the check can fail).
    let sector = 512u64;
    let span = |i: usize| {
        (
            parts[i]["start"].as_u64().expect("start") * sector,
            parts[i]["size"].as_u64().expect("size") * sector,
        )
    };
    let work = tmp.path().join("verity");
    fs::create_dir_all(&work).expect("mkdir");
    let (doff, dlen) = span(1);
    let (hoff, hlen) = span(2);
    let data = work.join("usr-a.img");
    let hash = work.join("usr-a.verity");
    extract(&out1.join("minimal.raw"), doff, dlen, &data);
    extract(&out1.join("minimal.raw"), hoff, hlen, &hash);
    ok(
        veritysetup_verify(&work, &data, &hash, &root_hash),
        "veritysetup verify",
    );
    {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .expect("open data");
        f.seek(SeekFrom::Start(8192)).expect("seek");
        let mut b = [0u8; 1];
        f.read_exact(&mut b).expect("read");
        f.seek(SeekFrom::Start(8192)).expect("seek");
        f.write_all(&[b[0] ^ 0xff]).expect("write");
    }
    assert!(
        !veritysetup_verify(&work, &data, &hash, &root_hash)
            .status
            .success(),
        "tampered data still verified"
    );
    fs::remove_dir_all(&work).expect("cleanup");

    // 4. The UKI's .cmdline carries usrhash= with that hash (read by keel inspect).
    let inspect: Value = serde_json::from_str(&ok(
        keel()
            .arg("inspect")
            .arg(&out1)
            .arg("--json")
            .output()
            .expect("inspect"),
        "keel inspect",
    ))
    .expect("json");
    let cmdline = inspect["ukis"][0]["cmdline"].as_str().expect("cmdline");
    assert!(
        cmdline.contains(&format!("usrhash={root_hash}")),
        "{cmdline}"
    );
    assert_eq!(inspect["verity_partitions_found"], true);
    assert_eq!(inspect["ukis"][0]["path"], "EFI/Linux/keel-0.1.0.efi");

    // 5. Bootstrapping again from the cached packages gives a bit-for-bit identical disk image.
    let m2 = build(&def, &out2, &["--rebootstrap"]);
    let sha = |m: &Value, f: &str| {
        m["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .find(|a| a["file"] == f)
            .map(|a| a["sha256"].clone())
            .expect(f)
    };
    assert_eq!(
        sha(&m1, "minimal.raw"),
        sha(&m2, "minimal.raw"),
        "minimal.raw differs between two builds"
    );
    assert_eq!(m1["usr_root_hash"], m2["usr_root_hash"]);
    assert_eq!(
        m1["ostree_base_commit"], m2["ostree_base_commit"],
        "the re-bootstrapped tree differs"
    );

    // 6. keel log lists both builds; keel diff finds no change between them.
    let log = ok(
        keel().args(["log", "minimal"]).output().expect("log"),
        "keel log",
    );
    for m in [&m1, &m2] {
        let c = m["ostree_commit"].as_str().expect("commit");
        assert!(log.contains(&c[..12]), "{c} not in log:\n{log}");
    }
    let diff: Value = serde_json::from_str(&ok(
        keel()
            .arg("diff")
            .arg(&out1)
            .arg(&out2)
            .arg("--json")
            .output()
            .expect("diff"),
        "keel diff",
    ))
    .expect("json");
    for k in ["added", "removed", "modified"] {
        assert_eq!(
            diff["files"][k].as_array().map(|a| a.len()),
            Some(0),
            "files {k}: {diff}"
        );
    }

    // 7. A unit change is a new commit on the same cached base (no bootstrap), and keel diff
    //    shows that file and, since the definition enables it, the link the build's preset run
    //    made in the factory /etc (nodes copy their /etc from it; systemd does not preset again).
    let variant_dir = tmp.path().join("variant");
    fs::create_dir_all(variant_dir.join("images")).expect("mkdir");
    fs::create_dir_all(variant_dir.join("units")).expect("mkdir");
    fs::write(
        variant_dir.join("units/hello.service"),
        "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
    )
    .expect("write");
    fs::write(
        variant_dir.join("images/minimal.toml"),
        format!(
            "extends = \"{}\"\nunits = [\"hello.service\"]\nenable = [\"hello.service\"]\n",
            def.display()
        ),
    )
    .expect("write");
    let out3 = tmp.path().join("three");
    let m3 = build(&variant_dir.join("images/minimal.toml"), &out3, &[]);
    assert_eq!(
        m3["ostree_base_commit"], m1["ostree_base_commit"],
        "a unit change must not re-bootstrap"
    );
    let diff: Value = serde_json::from_str(&ok(
        keel()
            .arg("diff")
            .arg(&out1)
            .arg(&out3)
            .arg("--json")
            .output()
            .expect("diff"),
        "keel diff",
    ))
    .expect("json");
    let added: Vec<&str> = diff["files"]["added"]
        .as_array()
        .expect("added")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        added.contains(&"/lib/systemd/system/hello.service"),
        "{diff}"
    );
    assert!(
        added.contains(&"/share/factory/etc/systemd/system/multi-user.target.wants/hello.service"),
        "the enabled unit's link in the factory /etc: {diff}"
    );
    assert_ne!(m3["usr_root_hash"], m1["usr_root_hash"]);

    // 8. A build that fails leaves the previous outputs untouched and no staging behind.
    let before = fs::read(out1.join("manifest.json")).expect("manifest");
    fs::write(
        variant_dir.join("images/too-small.toml"),
        format!("extends = \"{}\"\nusr-size = \"64M\"\n", def.display()),
    )
    .expect("write");
    let o = keel()
        .arg("build")
        .arg(variant_dir.join("images/too-small.toml"))
        .arg("--out")
        .arg(&out1)
        .output()
        .expect("run");
    assert!(!o.status.success(), "a 64M usr slot cannot hold minimal");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("raise usr-size"), "{err}");
    assert_eq!(
        fs::read(out1.join("manifest.json")).expect("manifest"),
        before
    );
    let leftovers: Vec<_> = fs::read_dir(&out1)
        .expect("read")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // 10. `keel embed-config` puts a checked Ignition config on the ESP of a built image and
    //     updates the manifest's checksums; a bad config changes nothing.
    let emb = tmp.path().join("embed");
    ok(
        Command::new("cp")
            .arg("-a")
            .arg(&out1)
            .arg(&emb)
            .output()
            .expect("cp"),
        "cp build dir",
    );
    let good = tmp.path().join("good.ign");
    fs::write(&good, r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/etc/x","contents":{"source":"data:,x"}}]}}"#).expect("write");
    let bad = tmp.path().join("bad.ign");
    fs::write(
        &bad,
        r#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/usr/x"}]}}"#,
    )
    .expect("write");
    let raw = emb.join("minimal.raw");
    let raw_before = fs::read(&raw).expect("raw");
    let o = keel()
        .arg("embed-config")
        .arg(&emb)
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("storage.files.0.path"), "{err}");
    assert!(
        fs::read(&raw).expect("raw") == raw_before,
        "a refused config changed the image"
    );
    // Without a signature (or --unsigned) keel refuses: trusted images apply only signed ESP
    // configs. minimal has no [trust], so it takes an unsigned one.
    let o = keel()
        .arg("embed-config")
        .arg(&emb)
        .arg(&good)
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--unsigned"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(
        keel()
            .arg("embed-config")
            .arg(&emb)
            .arg(&good)
            .arg("--unsigned")
            .output()
            .expect("run"),
        "keel embed-config",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&raw).expect("raw").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "an image holding a config is its owner's only");
    }
    let esp_start = parts[0]["start"].as_u64().expect("start") * 512;
    let shown = ok(
        in_tools(
            tmp.path(),
            [
                "mtype".to_string(),
                "-i".into(),
                format!("{}@@{esp_start}", raw.display()),
                "::keel/config.ign".into(),
            ],
        ),
        "mtype keel/config.ign",
    );
    assert_eq!(shown.as_bytes(), fs::read(&good).expect("good").as_slice());
    let m: Value = serde_json::from_slice(&fs::read(emb.join("manifest.json")).expect("manifest"))
        .expect("json");
    let art = m["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .find(|a| a["file"] == "minimal.raw")
        .expect("raw artifact")
        .clone();
    let digest = ok(
        Command::new("sha256sum")
            .arg(&raw)
            .output()
            .expect("sha256sum"),
        "sha256sum",
    );
    assert_eq!(
        art["sha256"].as_str().expect("sha"),
        digest.split_whitespace().next().expect("digest")
    );

    // 9. A trusted variant: keys are created, the UKI's PCR 11 predictions and .pcrsig agree
    //    with systemd-measure (calculate/sign) on the same sections, and sbverify accepts the UKI
    //    and systemd-boot with the db certificate.
    check_signed_variant(&def, tmp.path());
}

/// The contents of `name` in a PE file, as the stub measures them (VirtualSize bytes).
fn pe_section(pe: &[u8], name: &str) -> Option<Vec<u8>> {
    use object::read::pe::PeFile64;
    let file = PeFile64::parse(pe).expect("PE");
    file.section_table().iter().find_map(|s| {
        let n = String::from_utf8_lossy(s.raw_name())
            .trim_end_matches('\0')
            .to_string();
        (n == name).then(|| {
            let off = s.pointer_to_raw_data.get(object::LittleEndian) as usize;
            let raw = s.size_of_raw_data.get(object::LittleEndian) as usize;
            let vsize = s.virtual_size.get(object::LittleEndian) as usize;
            let mut d = pe[off..off + raw.min(vsize)].to_vec();
            d.resize(vsize, 0);
            d
        })
    })
}

fn check_signed_variant(minimal: &Path, tmp: &Path) {
    let dir = tmp.join("signed");
    fs::create_dir_all(dir.join("images")).expect("mkdir");
    let def = dir.join("images/signed.toml");
    fs::write(
        &def,
        format!(
            "extends = \"{}\"\nname = \"signed\"\n[trust]\nkeys = \"../keys\"\ngenerate-keys = true\n",
            minimal.display()
        ),
    )
    .expect("write");
    let out = dir.join("out");
    let m = build(&def, &out, &[]);
    let keys = dir.join("keys");
    assert!(keys.join("pcr-initrd.key").is_file(), "keys were generated");
    let uki = fs::read(out.join("signed.efi")).expect("uki");
    let cmdline = String::from_utf8(pe_section(&uki, ".cmdline").expect(".cmdline")).expect("utf8");
    assert!(cmdline.contains("root=/dev/mapper/root"), "{cmdline}");
    assert_eq!(
        pe_section(&uki, ".pcrpkey").expect(".pcrpkey"),
        fs::read(keys.join("pcr-initrd.pub.pem")).expect("pub")
    );

    // Hand every measured section to systemd-measure as a file.
    let sect = dir.join("sections");
    fs::create_dir_all(&sect).expect("mkdir");
    let mut args = Vec::new();
    for (name, opt) in [
        (".linux", "--linux"),
        (".osrel", "--osrel"),
        (".cmdline", "--cmdline"),
        (".initrd", "--initrd"),
        (".uname", "--uname"),
        (".sbat", "--sbat"),
        (".pcrpkey", "--pcrpkey"),
    ] {
        let data = pe_section(&uki, name).unwrap_or_else(|| panic!("{name} missing"));
        let f = sect.join(name.trim_start_matches('.'));
        fs::write(&f, data).expect("write section");
        args.push(format!("{opt}={}", f.display()));
    }
    let measure = |extra: &[String]| -> String {
        let mut argv = vec!["/usr/lib/systemd/systemd-measure".to_string()];
        argv.extend(extra.iter().cloned());
        argv.extend(args.iter().cloned());
        argv.extend(["--bank=sha256".to_string(), "--json=short".to_string()]);
        ok(in_tools(&dir, argv), "systemd-measure")
    };
    // Keel's phases: systemd's, with `keel-root-opened` (measured by keel-root-init right after
    // the root volume opens) between enter-initrd and leave-initrd.
    let phases = [
        "enter-initrd",
        "enter-initrd:keel-root-opened",
        "enter-initrd:keel-root-opened:leave-initrd",
        "enter-initrd:keel-root-opened:leave-initrd:sysinit",
        "enter-initrd:keel-root-opened:leave-initrd:sysinit:ready",
    ];
    let mut calc_args = vec!["calculate".to_string()];
    calc_args.extend(phases.iter().map(|p| format!("--phase={p}")));
    let calc: Value = serde_json::from_str(&measure(&calc_args)).expect("calculate JSON");
    let theirs = phase_values(&calc["sha256"], "hash");
    let ours = phase_values(&m["trust"]["pcr11"], "sha256");
    assert_eq!(
        ours, theirs,
        "keel's PCR 11 predictions vs systemd-measure calculate"
    );

    let sign = |key: &str, phases: &[&str]| -> Vec<Value> {
        let mut a = vec![
            "sign".to_string(),
            format!(
                "--private-key={}",
                keys.join(format!("{key}.key")).display()
            ),
            format!(
                "--public-key={}",
                keys.join(format!("{key}.pub.pem")).display()
            ),
        ];
        a.extend(phases.iter().map(|p| format!("--phase={p}")));
        let v: Value = serde_json::from_str(&measure(&a)).expect("sign JSON");
        v["sha256"].as_array().expect("sha256").clone()
    };
    let mut want = sign("pcr-initrd", &["enter-initrd"]);
    want.extend(sign(
        "pcr-boot",
        &[
            "enter-initrd:keel-root-opened:leave-initrd",
            "enter-initrd:keel-root-opened:leave-initrd:sysinit",
            "enter-initrd:keel-root-opened:leave-initrd:sysinit:ready",
        ],
    ));
    let pcrsig: Value = serde_json::from_slice(
        pe_section(&uki, ".pcrsig")
            .expect(".pcrsig")
            .split(|b| *b == 0)
            .next()
            .expect("json"),
    )
    .expect(".pcrsig JSON");
    let mut got = pcrsig["sha256"].as_array().expect("sha256").clone();
    let key = |v: &Value| v["pol"].as_str().unwrap_or_default().to_string();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want, ".pcrsig vs systemd-measure sign");

    // Secure Boot signatures: the UKI and the ESP's systemd-boot verify against db.crt.
    let sbverify = |efi: &Path| {
        in_tools(
            &dir,
            [
                "sbverify".as_ref(),
                "--cert".as_ref(),
                keys.join("db.crt").as_os_str(),
                efi.as_os_str(),
            ],
        )
    };
    ok(sbverify(&out.join("signed.efi")), "sbverify of the UKI");

    // The tampering `keel test` does, on the real UKI: a changed command line keeps the
    // signature bytes but moves PCR 11 off every signed policy; a flipped kernel byte breaks the
    // Authenticode signature.
    let changed = keel::host::testing::tamper::replace_cmdline(
        &uki,
        "systemd.firstboot=off",
        "init=/usr/bin/sh",
    )
    .expect("replace cmdline");
    assert_eq!(changed.len(), uki.len());
    let sections = keel::trust::measure::measured_sections(&changed).expect("sections");
    let predicted = keel::trust::measure::predict(&sections);
    for p in &predicted {
        assert!(
            !got.iter().any(|e| e["pol"] == p.policy.as_str()),
            "a changed command line must match no signed policy ({})",
            p.phase
        );
    }
    let flipped = keel::host::testing::tamper::flip_linux_byte(&uki).expect("flip");
    let bad = dir.join("flipped.efi");
    fs::write(&bad, flipped).expect("write");
    let o = sbverify(&bad);
    assert!(
        !o.status.success(),
        "sbverify must reject a UKI with a flipped kernel byte"
    );
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[test]
fn bad_definition_fails_before_any_work_with_file_line_and_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(tmp.path().join("images")).expect("mkdir");
    let def = tmp.path().join("images/bad.toml");
    fs::write(&def, "name = \"bad\"\nversion = \"1\"\npackages = [\"systemd\", \"linux-image-amd64\"]\nusr-size = \"12X\"\n").expect("write");
    let o = keel()
        .arg("build")
        .arg(&def)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.toml:4:12") && err.contains("unknown size suffix"),
        "{err}"
    );
    assert!(!tmp.path().join("out").join("bad.raw").exists());
}
