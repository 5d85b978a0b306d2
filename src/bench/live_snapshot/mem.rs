//! Guest memory as raw mappings, the snapshot file's I/O from them, and the dirty bitmap.
//!
//! Guest memory is shared with the guest: nothing here forms a Rust reference into a mapping.
//! Bytes go in and out by raw-pointer copies (`pwrite` straight from the mapping, volatile
//! reads for the mailbox, one `copy_nonoverlapping` of the boot image before the guest runs).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Bytes of a page (KVM's dirty log has one bit per 4 KiB page).
pub const PAGE: u64 = 4096;

/// One anonymous or file mapping holding guest memory; unmapped on drop.
#[derive(Debug)]
pub struct GuestMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is a raw address range; every access goes through raw pointers and the
// kernel, never through references, so sharing the address between threads is sound.
unsafe impl Send for GuestMap {}
// SAFETY: see Send.
unsafe impl Sync for GuestMap {}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl GuestMap {
    fn map(len: usize, prot: i32, flags: i32, fd: i32, off: u64) -> Result<GuestMap, String> {
        if len == 0 || len as u64 % PAGE != 0 || off % PAGE != 0 {
            return Err(format!(
                "guest mapping of {len:#x} bytes at offset {off:#x}: not page sized"
            ));
        }
        let off = libc::off_t::try_from(off).map_err(|_| format!("offset {off:#x} too large"))?;
        // SAFETY: a new mapping at a kernel-chosen address; no existing memory is affected.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(os_err(&format!("mmap {len:#x} bytes")));
        }
        Ok(GuestMap { ptr: p.cast(), len })
    }

    /// `len` bytes of private anonymous memory (zero, allocated on first touch).
    pub fn anonymous(len: usize) -> Result<GuestMap, String> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    }

    /// `len` bytes of `file` from `off`, `MAP_PRIVATE`: reads fault in the file's page-cache
    /// pages, the first write to a page copies it (the file is never written through it).
    /// With `populate`, every page is read and mapped now, read-only (`MADV_POPULATE_READ`:
    /// no copies; a write still copies its page), not on first access.
    pub fn file_private(
        file: &File,
        off: u64,
        len: usize,
        populate: bool,
    ) -> Result<GuestMap, String> {
        let m = Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )?;
        if populate {
            // SAFETY: advice on our own mapping; it changes no contents.
            if unsafe { libc::madvise(m.ptr.cast(), m.len, libc::MADV_POPULATE_READ) } != 0 {
                return Err(os_err("madvise(MADV_POPULATE_READ)"));
            }
        }
        Ok(m)
    }

    /// The host address KVM gets for this memory.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, len: usize) -> Result<(), String> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(format!(
                "{off:#x}+{len:#x} outside guest mapping of {:#x}",
                self.len
            )),
        }
    }

    /// Copy `data` to `off` (only while no vCPU runs on this memory).
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), String> {
        self.check(off, data.len())?;
        // SAFETY: in bounds (checked); a raw copy, no reference into the mapping is formed.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Volatile copy of `off..off + buf.len()` into `buf` (the guest may be writing it).
    pub fn read_volatile(&self, off: usize, buf: &mut [u8]) -> Result<(), String> {
        self.check(off, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: in bounds (checked); a volatile byte read through a raw pointer.
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) };
        }
        Ok(())
    }

    /// `pwrite` bytes `off..off + len` of this mapping to `file` at `file_off`, straight from
    /// the mapping (the kernel copies; no bounce buffer, no reference). Returns bytes written.
    pub fn pwrite_to(&self, file: &File, off: u64, len: u64, file_off: u64) -> Result<u64, String> {
        let (o, l) = (
            usize::try_from(off).map_err(|_| "offset too large".to_string())?,
            usize::try_from(len).map_err(|_| "length too large".to_string())?,
        );
        self.check(o, l)?;
        let mut done = 0usize;
        while done < l {
            // Linux writes at most 0x7fff_f000 bytes per call.
            let n = (l - done).min(1 << 30);
            let at = libc::off_t::try_from(file_off + done as u64)
                .map_err(|_| "file offset too large".to_string())?;
            // SAFETY: the source range is inside this mapping (checked); the kernel reads it.
            let r = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    self.ptr.add(o + done).cast::<libc::c_void>(),
                    n,
                    at,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("pwrite snapshot: {e}"));
            }
            if r == 0 {
                return Err("pwrite snapshot: wrote nothing".into());
            }
            done += r as usize;
        }
        Ok(len)
    }
}

impl Drop for GuestMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, mapped in `map`; no reference into it exists.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Runs of set bits in a KVM dirty bitmap (bit `i` of word `i / 64` = page `i`) over the first
/// `pages` pages, as `(first_page, page_count)` in ascending order; bits past `pages` are
/// ignored.
pub fn dirty_ranges(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            let page = w as u64 * 64 + b;
            if page >= pages {
                return out;
            }
            bits &= bits - 1;
            match out.last_mut() {
                Some((start, n)) if *start + *n == page => *n += 1,
                _ => out.push((page, 1)),
            }
        }
    }
    out
}

/// Bytes of `file` (of `len` bytes) resident in the page cache, by `mincore` on a temporary
/// read-only shared mapping.
pub fn page_cache_bytes(file: &File, len: u64) -> Result<u64, String> {
    if len == 0 {
        return Ok(0);
    }
    let rounded = len.div_ceil(PAGE) * PAGE;
    let l = usize::try_from(rounded).map_err(|_| "file too large".to_string())?;
    let m = GuestMap::map(l, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0)?;
    let mut vec = vec![0u8; l / PAGE as usize];
    // SAFETY: `m` is our mapping of `l` bytes; `vec` has one byte per page of it.
    let r = unsafe { libc::mincore(m.ptr.cast(), l, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(os_err("mincore"));
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bitmap_to_ranges() {
        assert!(dirty_ranges(&[], 100).is_empty());
        assert!(dirty_ranges(&[0, 0], 128).is_empty());
        assert_eq!(dirty_ranges(&[0b1011], 64), vec![(0, 2), (3, 1)]);
        // A run across a word boundary is one range.
        assert_eq!(dirty_ranges(&[1u64 << 63, 0b11], 128), vec![(63, 3)]);
        // Bits past the slot's pages are ignored.
        assert_eq!(dirty_ranges(&[u64::MAX], 10), vec![(0, 10)]);
        assert_eq!(dirty_ranges(&[u64::MAX, u64::MAX], 128), vec![(0, 128)]);
        assert_eq!(
            dirty_ranges(&[1 << 5, 1 << 0, 1 << 63], 192),
            vec![(5, 1), (64, 1), (191, 1)]
        );
    }

    #[test]
    fn mapping_bounds_are_checked() {
        let m = GuestMap::anonymous(PAGE as usize).unwrap();
        m.write(0, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read_volatile(0, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(m.write(PAGE as usize - 1, b"ab").is_err());
        assert!(m.read_volatile(usize::MAX, &mut b).is_err());
        assert!(GuestMap::anonymous(100).is_err());
        assert!(GuestMap::anonymous(0).is_err());
    }
}
