//! The low-memory image: mailbox, GDT (with the TSS descriptor), program, TSS with its I/O
//! permission bitmap, and identity-mapping page tables.

use super::error::GuestError;
use super::layout::*;
use super::mailbox::{check_params, put_u64, write_params, GuestParams};
use super::program::GUEST_CODE;

/// A GDT descriptor word for a flat 4 GiB segment: `access` byte and `flags` nibble (G, D/B, L).
const fn flat_desc(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The GDT, indexed by selector / 8. Index 8..9 (selector 0x40) is the 16-byte TSS descriptor,
/// filled in by [`build_image`].
const GDT: [u64; 8] = [
    0,                    // 0x00 null
    flat_desc(0x9b, 0xc), // 0x08 kernel code 32
    flat_desc(0x9b, 0xa), // 0x10 kernel code 64 (L)
    flat_desc(0x93, 0xc), // 0x18 kernel data
    flat_desc(0xfb, 0xc), // 0x20 user code 32
    flat_desc(0xf3, 0xc), // 0x28 user data (DPL 3)
    flat_desc(0xfb, 0xa), // 0x30 user code 64 (DPL 3, L)
    0,                    // 0x38 unused
];
/// GDT limit: 8 descriptors + the 16-byte TSS descriptor, minus one.
pub const GDT_LIMIT: u16 = (GDT.len() * 8 + 16 - 1) as u16;

/// Build the low-memory image into `low` (the bytes of guest physical `0..low.len()`):
/// zero the first [`LOW_IMAGE_SIZE`] bytes, then write the mailbox (with `params`), GDT, code,
/// TSS with I/O bitmap and page tables. Bytes past [`LOW_IMAGE_SIZE`] are left alone.
pub fn build_image(low: &mut [u8], params: &GuestParams) -> Result<(), GuestError> {
    if low.len() < LOW_IMAGE_SIZE {
        return Err(GuestError::LowMemTooSmall {
            need: LOW_IMAGE_SIZE,
            got: low.len(),
        });
    }
    check_params(params)?;
    low[..LOW_IMAGE_SIZE].fill(0);

    let mb = MAILBOX_GPA as usize;
    write_params(&mut low[mb..mb + PAGE_SIZE as usize], params)?;

    let gdt = GDT_GPA as usize;
    for (i, d) in GDT.iter().enumerate() {
        put_u64(low, gdt + i * 8, *d);
    }
    // 64-bit TSS descriptor: limit, base, type 0xb (busy 64-bit TSS), present.
    let (base, limit) = (TSS_GPA, u64::from(TSS_LIMIT));
    let tss_lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    put_u64(low, gdt + usize::from(TSS_SEL), tss_lo);
    put_u64(low, gdt + usize::from(TSS_SEL) + 8, base >> 32);

    let code = CODE_GPA as usize;
    low[code..code + GUEST_CODE.len()].copy_from_slice(&GUEST_CODE);

    // TSS: only the I/O map base matters (RSP0/IST are never used: the guest never enters CPL0).
    let tss = TSS_GPA as usize;
    low[tss + 0x66..tss + 0x68].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    let iomap = tss + TSS_IOMAP_OFFSET as usize;
    // Deny every port, then allow the guest's three 32-bit ports; the byte after the bitmap must
    // be 0xff.
    low[iomap..iomap + 0x2001].fill(0xff);
    for port in [PORT_STATUS, PORT_CLOCK, PORT_PROCEED] {
        for p in port..port + 4 {
            low[iomap + usize::from(p / 8)] &= !(1u8 << (p % 8));
        }
    }

    // Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g; PD g[i] -> 2 MiB page (g GiB + i * 2 MiB).
    // Present | writable | user on every level; PS on the PDEs.
    const PTE_PWU: u64 = 0x7;
    const PDE_PS: u64 = 0x80;
    put_u64(low, PML4_GPA as usize, PDPT_GPA | PTE_PWU);
    for g in 0..IDENTITY_MAP_GIB {
        let pd = PD_GPA + g * PAGE_SIZE;
        put_u64(low, (PDPT_GPA + g * 8) as usize, pd | PTE_PWU);
        for i in 0..512u64 {
            let page = (g << 30) | (i << 21);
            put_u64(low, (pd + i * 8) as usize, page | PDE_PS | PTE_PWU);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::guest::mailbox::*;

    #[test]
    fn image_layout() {
        let params = GuestParams {
            data_gpa: 4 << 30,
            data_len: 5 << 20,
            mode: GuestMode::RunUpdate,
        };
        let mut low = vec![0xccu8; LOW_MEM_SIZE];
        build_image(&mut low, &params).unwrap();
        const { assert!(LOW_IMAGE_SIZE <= LOW_MEM_SIZE) };
        assert_eq!(low[0], 0);
        assert_eq!(
            low[LOW_IMAGE_SIZE], 0xcc,
            "bytes past the image are untouched"
        );
        let mb = MAILBOX_GPA as usize;
        assert_eq!(get_u64(&low, mb + MB_MAGIC), GUEST_MAGIC);
        assert_eq!(get_u64(&low, mb + MB_DATA_GPA), 4 << 30);
        assert_eq!(get_u64(&low, mb + MB_DATA_LEN), 5 << 20);
        assert_eq!(get_u64(&low, mb + MB_MODE), MODE_RUN_UPDATE);
        let r = read_report(&low[mb..mb + MAILBOX_LEN]).unwrap();
        assert_eq!(
            r,
            GuestReport {
                status: STATUS_NONE,
                first_bad: None,
                max_gap_us: 0,
                loops: 0
            }
        );
        // 4 GiB + 2 MiB is mapped by PD 4, entry 1.
        let pde = get_u64(&low, (PD_GPA + 4 * PAGE_SIZE + 8) as usize);
        assert_eq!(pde, (4 << 30) | (2 << 20) | 0x87);
        // Ports allowed in the I/O bitmap, neighbours denied.
        let iomap = (TSS_GPA + TSS_IOMAP_OFFSET) as usize;
        let allowed = |p: u16| low[iomap + usize::from(p / 8)] & (1 << (p % 8)) == 0;
        assert!(allowed(PORT_STATUS) && allowed(PORT_CLOCK + 3) && allowed(PORT_PROCEED + 3));
        assert!(!allowed(PORT_STATUS - 1) && !allowed(PORT_PROCEED + 4) && !allowed(0x80));
        assert_eq!(low[iomap + 0x2000], 0xff);
        // User code segment descriptor: DPL 3, L.
        let cs = get_u64(&low, GDT_GPA as usize + usize::from(USER_CS & !7));
        assert_eq!((cs >> 45) & 3, 3);
        assert_eq!((cs >> 53) & 1, 1);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ok = GuestParams {
            data_gpa: 4 << 30,
            data_len: 5 << 20,
            mode: GuestMode::Write,
        };
        let mut small = vec![0u8; LOW_IMAGE_SIZE - 1];
        assert!(matches!(
            build_image(&mut small, &ok),
            Err(GuestError::LowMemTooSmall { .. })
        ));
        let mut low = vec![0u8; LOW_MEM_SIZE];
        for bad in [
            GuestParams {
                data_gpa: 0x1000,
                ..ok
            },
            GuestParams {
                data_gpa: IDENTITY_MAP_SIZE - 4,
                data_len: 8,
                ..ok
            },
            GuestParams {
                data_gpa: u64::MAX - 2,
                data_len: 8,
                ..ok
            },
        ] {
            assert!(matches!(
                build_image(&mut low, &bad),
                Err(GuestError::DataRange { .. })
            ));
        }
    }
}
