//! Generic ioctl argument handling (upstream's iommufd-style "ucmd" rules): the user buffer
//! starts with a u32 `size`; too small is EINVAL, larger with non-zero trailing bytes is E2BIG,
//! and the response copies back `min(size, sizeof)` bytes.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::errno::{Errno, SysResult};

/// Decode the argument struct `T` from the user's buffer.
pub fn read<T: FromBytes + IntoBytes>(arg: &[u8], min_size: usize) -> SysResult<T> {
    let size_bytes: [u8; 4] = arg
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(Errno::EFAULT)?;
    let size = u32::from_ne_bytes(size_bytes) as usize;
    if size > arg.len() {
        return Err(Errno::EFAULT);
    }
    if size < min_size {
        return Err(Errno::EINVAL);
    }
    let k = std::mem::size_of::<T>();
    if size > k && arg[k..size].iter().any(|&b| b != 0) {
        return Err(Errno::E2BIG);
    }
    let mut buf = vec![0u8; k];
    let n = size.min(k);
    buf[..n].copy_from_slice(&arg[..n]);
    T::read_from_bytes(&buf).map_err(|_| Errno::EFAULT)
}

/// Copy the response back: `min(size, sizeof(T))` bytes.
pub fn respond<T: IntoBytes + zerocopy::Immutable>(arg: &mut [u8], v: &T) -> SysResult<()> {
    let size = u32::from_ne_bytes(
        arg.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(Errno::EFAULT)?,
    ) as usize;
    let b = v.as_bytes();
    let n = size.min(b.len()).min(arg.len());
    arg[..n].copy_from_slice(&b[..n]);
    Ok(())
}

/// Split a command into (type, nr), requiring no direction or size bits.
pub fn decode(cmd: u64) -> (u64, u64, bool) {
    let nr = cmd & 0xff;
    let ty = (cmd >> 8) & 0xff;
    let clean = cmd >> 16 == 0;
    (ty, nr, clean)
}
