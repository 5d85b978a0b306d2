//! What LUO and every file kind above it may say about a file: its id in the host's open-file
//! table, and the file kind of the LUO core tests.

/// A file's id in the host's open-file table (see `host::files::FileTable`).
pub type FileId = u64;

/// A file for LUO core tests: preserved by the `test-file` handler.
#[derive(Debug, Default, Clone)]
pub struct TestFile {
    /// The value the test handler preserves (8 bytes) and restores on retrieve.
    pub value: u64,
    /// Make the handler's `freeze` fail with this errno.
    pub fail_freeze: Option<i32>,
    /// Make the handler's `can_finish` say no.
    pub block_finish: bool,
}
