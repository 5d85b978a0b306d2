//! Wire formats only: structures that cross a kexec or the user API, with their compatible
//! strings and sizes. No logic beyond encoding helpers.

pub mod boundary;
pub mod errno;
pub mod kho;
pub mod kvm;
pub mod luo;
pub mod sections;
pub mod vcpu_state;
pub mod vm_state;

/// Copy a NUL-padded fixed-size string field into a `String`, failing on a missing NUL or
/// invalid UTF-8.
pub fn cstr_field(bytes: &[u8]) -> Option<String> {
    let n = bytes.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&bytes[..n]).ok().map(str::to_owned)
}

/// Write `s` into a fixed-size field, NUL-padded. Fails if `s` plus a NUL does not fit.
pub fn put_cstr<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() >= N || b.contains(&0) {
        return None;
    }
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    Some(out)
}
