//! banger's shared vocabulary.
//!
//! Everything here is plain data with validation and no I/O, so that the CLI, the daemon, the
//! store and the protocol agree on one definition of a VM name, a state, a size or an error code.

pub mod error_code;
pub mod ids;
pub mod name;
pub mod records;
pub mod size;
pub mod state;

pub use error_code::ErrorCode;
pub use ids::{OpId, VmId};
pub use name::{NameError, VmName, validate_artifact_name};
pub use records::{ImageMeta, ImageRecord, KernelRecord, VmRecord};
pub use size::{ByteSize, SizeError};
pub use state::VmState;
