//! Rendering an image from its OSTree commit: the erofs /usr and its verity tree, the initrd, the
//! UKI, the ESP and the GPT disk, and the output formats.

pub mod disk;
pub mod initrd;
pub mod initrd_prune;
pub mod uki;
pub mod usr;
