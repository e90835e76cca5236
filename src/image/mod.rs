//! Image definitions: the TOML files under `images/` that say what an image contains.
//!
//! A definition is parsed strictly (unknown fields are errors), may `extends` another one, and is
//! validated as a whole before any build work starts.

mod definition;
mod size;

pub use definition::{
    line_col as definition_line_col, ContainerSettings, Definition, DefinitionError, FileEntry,
    Origin, OutputFormat, TrustSettings, UnitEntry, UpdateSettings, WithoutTpm, DEFAULT_MIRROR,
};
pub use size::ByteSize;
