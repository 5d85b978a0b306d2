//! Files: memfd and its LUO handler. The open-file table and the kinds of file are at the
//! composition root ([`crate::host::files`]).

pub mod memfd;
pub mod memfd_luo;

pub use crate::luo::{FileId, TestFile};
pub use memfd::Memfd;

use crate::abi::errno::{Errno, SysResult};

/// The largest file offset (`MAX_LFS_FILESIZE` on 64-bit Linux: `loff_t` is signed).
pub const MAX_LFS_FILESIZE: u64 = i64::MAX as u64;

/// The checks `vfs_fallocate` makes before any file's own: a negative offset (as `loff_t`) or a
/// length that is zero or negative is EINVAL, an end past [`MAX_LFS_FILESIZE`] is EFBIG.
/// Returns the end, `off + len`, which then cannot overflow.
pub fn fallocate_range(off: u64, len: u64) -> SysResult<u64> {
    if off > MAX_LFS_FILESIZE || len == 0 || len > MAX_LFS_FILESIZE {
        return Err(Errno::EINVAL);
    }
    match off.checked_add(len) {
        Some(end) if end <= MAX_LFS_FILESIZE => Ok(end),
        _ => Err(Errno::EFBIG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallocate_range_is_vfs_fallocate_s() {
        let max = MAX_LFS_FILESIZE;
        assert_eq!(fallocate_range(0, 4096), Ok(4096));
        assert_eq!(fallocate_range(max - 1, 1), Ok(max));
        assert_eq!(fallocate_range(0, max), Ok(max));
        for (off, len) in [
            (0, 0),
            (max + 1, 1),
            (u64::MAX, 1),
            (0, max + 1),
            (0, u64::MAX),
        ] {
            assert_eq!(
                fallocate_range(off, len),
                Err(Errno::EINVAL),
                "{off:#x}+{len:#x}"
            );
        }
        for (off, len) in [(max, 1), (1, max), (max / 2 + 1, max / 2 + 1)] {
            assert_eq!(
                fallocate_range(off, len),
                Err(Errno::EFBIG),
                "{off:#x}+{len:#x}"
            );
        }
    }
}
