//! Memory management of the host image: RAM (the direct map), the buddy frame allocator and the
//! scratch zone used during early boot after a KHO kexec.

pub mod bitmap;
pub mod buddy;
pub mod ram;

pub use bitmap::Bitmap;
pub use buddy::{FrameAllocator, FrameStats, Zone};
pub use ram::{PhysRead, Ram};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Largest buddy order: 2^10 pages = 4 MiB blocks.
pub const MAX_ORDER: u32 = 10;

pub fn pfn_to_pa(pfn: u64) -> u64 {
    pfn << PAGE_SHIFT
}

pub fn pa_to_pfn(pa: u64) -> u64 {
    pa >> PAGE_SHIFT
}

/// A folio: 2^order physically contiguous, naturally aligned frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Folio {
    pub pfn: u64,
    pub order: u32,
}

impl Folio {
    pub fn pa(&self) -> u64 {
        pfn_to_pa(self.pfn)
    }
    pub fn nr_pages(&self) -> u64 {
        1 << self.order
    }
    pub fn size(&self) -> u64 {
        PAGE_SIZE << self.order
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MmError {
    #[error("RAM size {0} is not usable (must be non-zero, page-aligned and match the memfd)")]
    BadRamSize(u64),
    #[error("physical range {pa:#x}+{len:#x} lies outside RAM")]
    OutOfRam { pa: u64, len: u64 },
    #[error("out of memory: no free block of order {order} in the {zone:?} zone")]
    NoMemory { order: u32, zone: Zone },
    #[error("order {0} exceeds MAX_ORDER {MAX_ORDER}")]
    BadOrder(u32),
    #[error("frame block pfn {pfn:#x} order {order} is misaligned or outside its zone")]
    BadBlock { pfn: u64, order: u32 },
    #[error("frame block pfn {pfn:#x} order {order} is already free")]
    DoubleFree { pfn: u64, order: u32 },
    #[error("scratch range {start:#x}+{len:#x} is not usable: {why}")]
    BadScratch { start: u64, len: u64, why: &'static str },
    #[error("system call failed: {0}")]
    Sys(rustix::io::Errno),
}

impl MmError {
    pub fn errno(&self) -> i32 {
        match self {
            MmError::NoMemory { .. } => libc::ENOMEM,
            MmError::Sys(e) => e.raw_os_error(),
            _ => libc::EINVAL,
        }
    }
}
