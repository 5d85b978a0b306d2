//! LUO user API (`include/uapi/linux/liveupdate.h`) and serialization ABI
//! (`include/linux/kho/abi/luo.h`, "luo-v5" layout).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// ioctl type byte of every LUO ioctl.
pub const LIVEUPDATE_IOCTL_TYPE: u64 = 0xBA;
/// Bytes of a session name field, NUL included (so names are 1–63 bytes).
pub const LIVEUPDATE_SESSION_NAME_LENGTH: usize = 64;
/// Bytes of a file handler's compatible string field, NUL included.
pub const LIVEUPDATE_HNDL_COMPAT_LENGTH: usize = 48;

/// First ioctl nr served on `/dev/liveupdate`.
pub const LIVEUPDATE_CMD_BASE: u64 = 0x00;
/// First ioctl nr served on a session fd; lower numbers there are EINVAL.
pub const LIVEUPDATE_CMD_SESSION_BASE: u64 = 0x40;

/// `_IO(0xBA, nr)`: no direction or size bits.
pub const fn luo_io(nr: u64) -> u64 {
    (LIVEUPDATE_IOCTL_TYPE << 8) | nr
}

/// `/dev/liveupdate` ioctl (0xBA00): create an outgoing session, argument [`CreateSession`].
pub const LIVEUPDATE_IOCTL_CREATE_SESSION: u64 = luo_io(0x00);
/// `/dev/liveupdate` ioctl (0xBA01): retrieve an incoming session by name, argument
/// [`RetrieveSession`]; ENOENT if there is none.
pub const LIVEUPDATE_IOCTL_RETRIEVE_SESSION: u64 = luo_io(0x01);
/// Session ioctl (0xBA40): preserve a file under a token, argument [`PreserveFd`].
pub const LIVEUPDATE_SESSION_PRESERVE_FD: u64 = luo_io(0x40);
/// Session ioctl (0xBA41): retrieve the file preserved under a token, argument [`RetrieveFd`].
pub const LIVEUPDATE_SESSION_RETRIEVE_FD: u64 = luo_io(0x41);
/// Session ioctl (0xBA42): finish an incoming session, argument [`SessionFinish`].
pub const LIVEUPDATE_SESSION_FINISH: u64 = luo_io(0x42);
/// Session ioctl (0xBA43): read the session's full name, argument [`SessionGetName`].
pub const LIVEUPDATE_SESSION_GET_NAME: u64 = luo_io(0x43);

/// `struct liveupdate_ioctl_create_session` (72 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateSession {
    /// Size of the caller's struct in bytes (at least 72).
    pub size: u32,
    /// Out: the new session fd (close-on-exec).
    pub fd: i32,
    /// In: the session name, NUL-terminated within the 64 bytes.
    pub name: [u8; 64],
}

/// Same layout as [`CreateSession`].
pub type RetrieveSession = CreateSession;

/// `struct liveupdate_session_preserve_fd` (16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PreserveFd {
    /// Size of the caller's struct in bytes (at least 16).
    pub size: u32,
    /// In: the fd of the file to preserve.
    pub fd: i32,
    /// In: the caller's token for the file, unique within the session.
    pub token: u64,
}

/// Same layout as [`PreserveFd`] (fd is the output).
pub type RetrieveFd = PreserveFd;

/// `struct liveupdate_session_finish` (8 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SessionFinish {
    /// Size of the caller's struct in bytes (at least 8).
    pub size: u32,
    /// Must be zero (EINVAL otherwise).
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name` (72 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SessionGetName {
    /// Size of the caller's struct in bytes.
    pub size: u32,
    /// Must be zero (EINVAL otherwise).
    pub reserved: u32,
    /// Out: the session name, NUL-terminated.
    pub name: [u8; 64],
}

// ---- serialization ----

/// Name of the KHO subtree that holds [`LuoSer`].
pub const LUO_KHO_ENTRY_NAME: &str = "LUO";
/// Compatible string in [`LuoSer::compatible`]; the next image refuses any other.
pub const LUO_ABI_COMPATIBLE: &str = "luo-v5";

/// Root blob registered as the "LUO" subtree (32 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoSer {
    /// [`LUO_ABI_COMPATIBLE`], NUL-padded.
    pub compatible: [u8; 8],
    /// Live updates that led to the writing image (0 after a cold boot); the reader numbers
    /// itself one more.
    pub liveupdate_num: u64,
    /// Head of a block chain of [`LuoSessionSer`]; 0 when there are no sessions.
    pub sessions_pa: u64,
    /// Head of the file-lifecycle-bound (FLB) objects' chain: we have no FLBs, write 0 and
    /// ignore it on read.
    pub flbs_pa: u64,
}

/// One preserved file (64 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoFileSer {
    /// Compatible string of the handler that preserved the file, NUL-padded.
    pub compatible: [u8; LIVEUPDATE_HNDL_COMPAT_LENGTH],
    /// The handler's opaque handle, in practice the physical address of its preserved blob.
    pub data: u64,
    /// The user's token for the file.
    pub token: u64,
}

/// One session (80 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoSessionSer {
    /// The session name, NUL-padded.
    pub name: [u8; LIVEUPDATE_SESSION_NAME_LENGTH],
    /// Head of a block chain of [`LuoFileSer`].
    pub files: u64,
    /// Number of files in the chain.
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_numbers_match_upstream() {
        assert_eq!(std::mem::size_of::<CreateSession>(), 72);
        assert_eq!(std::mem::size_of::<PreserveFd>(), 16);
        assert_eq!(std::mem::size_of::<SessionFinish>(), 8);
        assert_eq!(std::mem::size_of::<SessionGetName>(), 72);
        assert_eq!(std::mem::size_of::<LuoSer>(), 32);
        assert_eq!(std::mem::size_of::<LuoFileSer>(), 64);
        assert_eq!(std::mem::size_of::<LuoSessionSer>(), 80);
        assert_eq!(LIVEUPDATE_IOCTL_CREATE_SESSION, 0xBA00);
        assert_eq!(LIVEUPDATE_SESSION_GET_NAME, 0xBA43);
    }
}
