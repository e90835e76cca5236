//! Cluster-wide material made on the operator's machine: TLS for etcd and keel-net.

pub mod init;
pub mod pki;
