//! `keel-agent`: the node-side program. So far it reports the node's measured boot state; the
//! container launcher (signed images only, enrolled hardware only) builds on this.

pub mod boot_state;
pub mod cli;
pub mod tpm;
