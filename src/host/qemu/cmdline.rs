//! The QEMU command line for a Keel VM, built from plain data so it can be tested and logged.

use std::ffi::OsString;
use std::path::PathBuf;

/// UEFI firmware files (Debian's `ovmf` package).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
    /// The Secure Boot build: needs SMM and a secure pflash.
    pub secure_boot: bool,
}

impl Firmware {
    pub const CODE: &'static str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    pub const VARS: &'static str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
    pub const CODE_SECBOOT: &'static str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";

    pub fn debian() -> Firmware {
        Firmware {
            code: Self::CODE.into(),
            vars_template: Self::VARS.into(),
            secure_boot: false,
        }
    }

    /// The Secure Boot OVMF; its variables come from [`crate::host::qemu::firmware::enroll`].
    pub fn debian_secure_boot() -> Firmware {
        Firmware {
            code: Self::CODE_SECBOOT.into(),
            vars_template: Self::VARS.into(),
            secure_boot: true,
        }
    }
}

/// A network interface of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// QEMU user networking (NAT to the host), with `host:guest` TCP forwards.
    User { forwards: Vec<(u16, u16)> },
    /// A port on a test's private switch (vde_switch control socket directory).
    Vde { switch: PathBuf, mac: String },
}

/// Everything that shapes one VM's QEMU process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub accel: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: Firmware,
    /// Per-VM writable copy of the OVMF variables.
    pub vars: PathBuf,
    /// The disk QEMU opens (a qcow2 overlay over the built image, or a raw copy).
    pub disk: PathBuf,
    /// The software TPM's control socket; `None` gives a machine without a TPM.
    pub swtpm_socket: Option<PathBuf>,
    /// Serial console: `None` means the terminal (interactive), else a log file.
    pub console: Option<PathBuf>,
    /// With a console log file: also a unix socket through which the console can be typed into
    /// (everything the guest writes still lands in the log file).
    pub console_input: Option<PathBuf>,
    pub qga_socket: Option<PathBuf>,
    pub qmp_socket: Option<PathBuf>,
    pub ignition: Option<PathBuf>,
    pub nets: Vec<NetSpec>,
    /// Wait for a saved machine state (`-incoming defer`, then QMP migrate-incoming) instead of
    /// booting.
    pub incoming: bool,
    /// The real-time clock's start (UTC, `2026-12-07T10:00:00`) instead of the host's time.
    pub rtc_base: Option<String>,
}

impl VmSpec {
    /// Arguments for qemu-system-x86_64.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(format!("{},process=keel-{}", self.name, self.name));
        push("-machine".into());
        push(if self.firmware.secure_boot {
            "q35,smm=on".into()
        } else {
            "q35,smm=off".into()
        });
        if self.firmware.secure_boot {
            // Only SMM code may write the variable store: the guest OS cannot change the keys.
            push("-global".into());
            push("driver=cfi.pflash01,property=secure,value=on".into());
        }
        push("-accel".into());
        push(if self.accel == "tcg" {
            "tcg,thread=multi".into()
        } else {
            self.accel.clone()
        });
        if self.accel == "kvm" {
            push("-cpu".into());
            push("host".into());
        } else {
            push("-cpu".into());
            push("max".into());
        }
        push("-smp".into());
        push(self.cpus.to_string());
        push("-m".into());
        push(format!("{}M", self.memory_mib));
        if let Some(base) = &self.rtc_base {
            push("-rtc".into());
            push(format!("base={base}"));
        }
        push("-nodefaults".into());
        push("-no-user-config".into());
        push("-display".into());
        push("none".into());
        push("-drive".into());
        push(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            self.firmware.code.display()
        ));
        push("-drive".into());
        push(format!(
            "if=pflash,format=raw,unit=1,file={}",
            self.vars.display()
        ));
        if let Some(sock) = &self.swtpm_socket {
            push("-chardev".into());
            push(format!("socket,id=chrtpm,path={}", sock.display()));
            push("-tpmdev".into());
            push("emulator,id=tpm0,chardev=chrtpm".into());
            push("-device".into());
            push("tpm-crb,tpmdev=tpm0".into());
        }
        push("-drive".into());
        push(format!(
            "if=none,id=disk0,format={},file={},discard=unmap",
            if self.disk.extension().is_some_and(|e| e == "raw") {
                "raw"
            } else {
                "qcow2"
            },
            self.disk.display()
        ));
        push("-device".into());
        push("virtio-blk-pci,drive=disk0,bootindex=1".into());
        push("-device".into());
        push("virtio-rng-pci".into());
        match &self.console {
            None => {
                push("-serial".into());
                push("mon:stdio".into());
            }
            Some(path) => {
                push("-chardev".into());
                match &self.console_input {
                    None => push(format!("file,id=console0,path={}", path.display())),
                    Some(sock) => push(format!(
                        "socket,id=console0,path={},server=on,wait=off,logfile={},logappend=on",
                        sock.display(),
                        path.display()
                    )),
                }
                push("-serial".into());
                push("chardev:console0".into());
            }
        }
        if let Some(sock) = &self.qga_socket {
            push("-chardev".into());
            push(format!(
                "socket,id=qga0,path={},server=on,wait=off",
                sock.display()
            ));
            push("-device".into());
            push("virtio-serial-pci".into());
            push("-device".into());
            push("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into());
        }
        if let Some(sock) = &self.qmp_socket {
            push("-qmp".into());
            push(format!("unix:{},server=on,wait=off", sock.display()));
        }
        if let Some(ign) = &self.ignition {
            push("-fw_cfg".into());
            push(format!("name=opt/com.coreos/config,file={}", ign.display()));
        }
        if self.incoming {
            push("-incoming".into());
            push("defer".into());
        }
        for (i, n) in self.nets.iter().enumerate() {
            match n {
                NetSpec::User { forwards } => {
                    let mut s = format!("user,id=net{i}");
                    for (h, g) in forwards {
                        s.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
                    }
                    push("-netdev".into());
                    push(s);
                    push("-device".into());
                    push(format!("virtio-net-pci,netdev=net{i}"));
                }
                NetSpec::Vde { switch, mac } => {
                    push("-netdev".into());
                    push(format!("vde,id=net{i},sock={}", switch.display()));
                    push("-device".into());
                    push(format!("virtio-net-pci,netdev=net{i},mac={mac}"));
                }
            }
        }
        a
    }
}

/// A locally administered MAC address for node `index` on a test network.
pub fn node_mac(index: usize) -> String {
    format!("52:54:00:4b:00:{:02x}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "n1".into(),
            accel: "tcg".into(),
            memory_mib: 2048,
            cpus: 2,
            firmware: Firmware::debian(),
            vars: "/vm/vars.fd".into(),
            disk: "/vm/disk.qcow2".into(),
            swtpm_socket: Some("/vm/tpm/sock".into()),
            console: Some("/vm/console.log".into()),
            console_input: None,
            qga_socket: Some("/vm/qga.sock".into()),
            qmp_socket: Some("/vm/qmp.sock".into()),
            ignition: Some("/vm/config.ign".into()),
            nets: vec![
                NetSpec::User {
                    forwards: vec![(2222, 22)],
                },
                NetSpec::Vde {
                    switch: "/t/switch".into(),
                    mac: node_mac(0),
                },
            ],
            incoming: false,
            rtc_base: None,
        }
    }

    fn joined(s: &VmSpec) -> String {
        s.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_firmware_tpm_disk_and_channels() {
        let j = joined(&spec());
        for want in [
            "-accel tcg,thread=multi",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "if=pflash,format=raw,unit=1,file=/vm/vars.fd",
            "socket,id=chrtpm,path=/vm/tpm/sock",
            "tpm-crb,tpmdev=tpm0",
            "format=qcow2,file=/vm/disk.qcow2",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp unix:/vm/qmp.sock,server=on,wait=off",
            "-fw_cfg name=opt/com.coreos/config,file=/vm/config.ign",
            "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22",
            "vde,id=net1,sock=/t/switch",
            "mac=52:54:00:4b:00:01",
            "file,id=console0,path=/vm/console.log",
        ] {
            assert!(j.contains(want), "missing `{want}` in {j}");
        }
    }

    #[test]
    fn a_clock_ahead_is_the_rtc_base() {
        let mut s = spec();
        assert!(!joined(&s).contains("-rtc"));
        s.rtc_base = Some("2026-12-08T00:03:00".into());
        assert!(joined(&s).contains("-rtc base=2026-12-08T00:03:00"));
    }

    #[test]
    fn console_with_input_is_a_logged_socket() {
        let mut s = spec();
        s.console_input = Some("/vm/console.sock".into());
        let a: Vec<String> = s
            .args()
            .iter()
            .map(|x| x.to_string_lossy().into())
            .collect();
        assert!(a.contains(
            &"socket,id=console0,path=/vm/console.sock,server=on,wait=off,logfile=/vm/console.log,logappend=on".to_string()
        ), "{a:?}");
    }

    #[test]
    fn interactive_console_uses_stdio_and_kvm_uses_host_cpu() {
        let mut s = spec();
        s.console = None;
        s.accel = "kvm".into();
        let j = joined(&s);
        assert!(j.contains("-serial mon:stdio"));
        assert!(j.contains("-accel kvm -cpu host"));
    }
}
