//! Session names as `/dev/liveupdate` takes them. The device itself (exclusive open, first-open
//! deserialization, CREATE/RETRIEVE_SESSION) is served by the host: `host::luo::core`.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::luo::LIVEUPDATE_SESSION_NAME_LENGTH;

/// A valid session name: 1..=63 bytes before a NUL inside the 64-byte field.
pub fn session_name(field: &[u8; LIVEUPDATE_SESSION_NAME_LENGTH]) -> SysResult<String> {
    let len = field.iter().position(|&b| b == 0).ok_or(Errno::EINVAL)?;
    if len == 0 {
        return Err(Errno::EINVAL);
    }
    Ok(String::from_utf8_lossy(&field[..len]).into_owned())
}
