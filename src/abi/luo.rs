//! LUO user API (`include/uapi/linux/liveupdate.h`) and serialization ABI
//! (`include/linux/kho/abi/luo.h`, "luo-v5" layout).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const LIVEUPDATE_IOCTL_TYPE: u64 = 0xBA;
pub const LIVEUPDATE_SESSION_NAME_LENGTH: usize = 64;
pub const LIVEUPDATE_HNDL_COMPAT_LENGTH: usize = 48;

pub const LIVEUPDATE_CMD_BASE: u64 = 0x00;
pub const LIVEUPDATE_CMD_SESSION_BASE: u64 = 0x40;

/// `_IO(0xBA, nr)`: no direction or size bits.
pub const fn luo_io(nr: u64) -> u64 {
    (LIVEUPDATE_IOCTL_TYPE << 8) | nr
}

pub const LIVEUPDATE_IOCTL_CREATE_SESSION: u64 = luo_io(0x00);
pub const LIVEUPDATE_IOCTL_RETRIEVE_SESSION: u64 = luo_io(0x01);
pub const LIVEUPDATE_SESSION_PRESERVE_FD: u64 = luo_io(0x40);
pub const LIVEUPDATE_SESSION_RETRIEVE_FD: u64 = luo_io(0x41);
pub const LIVEUPDATE_SESSION_FINISH: u64 = luo_io(0x42);
pub const LIVEUPDATE_SESSION_GET_NAME: u64 = luo_io(0x43);

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateSession {
    pub size: u32,
    pub fd: i32,
    pub name: [u8; 64],
}

/// Same layout as [`CreateSession`].
pub type RetrieveSession = CreateSession;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PreserveFd {
    pub size: u32,
    pub fd: i32,
    pub token: u64,
}

/// Same layout as [`PreserveFd`] (fd is the output).
pub type RetrieveFd = PreserveFd;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SessionFinish {
    pub size: u32,
    pub reserved: u32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SessionGetName {
    pub size: u32,
    pub reserved: u32,
    pub name: [u8; 64],
}

// ---- serialization ----

pub const LUO_KHO_ENTRY_NAME: &str = "LUO";
pub const LUO_ABI_COMPATIBLE: &str = "luo-v5";

/// Root blob registered as the "LUO" subtree (32 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoSer {
    pub compatible: [u8; 8],
    pub liveupdate_num: u64,
    /// Head of a block chain of [`LuoSessionSer`]; 0 when there are no sessions.
    pub sessions_pa: u64,
    pub flbs_pa: u64,
}

/// One preserved file (64 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoFileSer {
    pub compatible: [u8; LIVEUPDATE_HNDL_COMPAT_LENGTH],
    pub data: u64,
    pub token: u64,
}

/// One session (80 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LuoSessionSer {
    pub name: [u8; LIVEUPDATE_SESSION_NAME_LENGTH],
    /// Head of a block chain of [`LuoFileSer`].
    pub files: u64,
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
