//! The data pattern the guest writes and verifies, and its host-side twins.

/// The pattern: the byte at offset `i` of the data region.
#[inline]
pub fn pattern_byte(i: u64) -> u8 {
    (i ^ 0x5a) as u8
}

/// The pattern word (little-endian) for the 8 bytes at data offset `i`, `i` a multiple of 8.
/// The guest computes the same `((i & 0xff) * 0x0101..01 + 0x0706..00) ^ 0x5a5a..5a`.
#[inline]
pub fn pattern_word(i: u64) -> u64 {
    ((i & 0xff).wrapping_mul(0x0101_0101_0101_0101) + 0x0706_0504_0302_0100) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// Host side: fill `buf` with the pattern, `buf[0]` being data offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset.wrapping_add(k as u64));
    }
}

/// Host side: the first data offset in `buf` (whose `buf[0]` is data offset `offset`) that does
/// not hold the pattern.
pub fn find_mismatch(buf: &[u8], offset: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|&(k, &b)| b != pattern_byte(offset.wrapping_add(k as u64)))
        .map(|(k, _)| offset.wrapping_add(k as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_word_matches_bytes() {
        for i in (0..4096u64).step_by(8) {
            let mut bytes = [0u8; 8];
            fill_pattern(&mut bytes, i);
            assert_eq!(u64::from_le_bytes(bytes), pattern_word(i), "offset {i}");
        }
        assert_eq!(pattern_byte(0), 0x5a);
        assert_eq!(pattern_byte(0x5a), 0);
        assert_eq!(pattern_byte(0x1ff), 0xa5);
    }

    #[test]
    fn find_mismatch_reports_first_bad() {
        let mut buf = vec![0u8; 4099];
        fill_pattern(&mut buf, 12);
        assert_eq!(find_mismatch(&buf, 12), None);
        buf[4000] ^= 1;
        buf[4010] ^= 1;
        assert_eq!(find_mismatch(&buf, 12), Some(4012));
    }
}
