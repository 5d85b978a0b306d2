//! The container of the saved-state blobs that cross a kexec (a vCPU's, a VM's): an 8-byte
//! magic, a version (u32), a section count (u32), then per section a tag (u32), a byte length
//! (u32) and the section's bytes, and a CRC-32 of everything before it. All integers
//! little-endian (an x86-64-only format). [`encode`] writes it; [`decode`] checks magic,
//! version, checksum and every length, and returns the sections, each tag at most once.

/// Why an encoding could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SectionError {
    /// Damaged or not this kind of blob.
    #[error("{0}")]
    Decode(&'static str),
    /// Another version of the format.
    #[error("unsupported version {0}")]
    Version(u32),
}

/// `magic`, `version` and `sections` (tag, bytes) with the trailing CRC-32.
pub fn encode(magic: &[u8; 8], version: u32, sections: &[(u32, &[u8])]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + sections.iter().map(|s| 8 + s.1.len()).sum::<usize>() + 4);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (tag, body) in sections {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off.checked_add(4)?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The sections of an [`encode`]d blob, in order; tags are 1..=`max_tag`, each at most once.
/// Any damage is an error, never a panic.
pub fn decode<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    version: u32,
    max_tag: u32,
) -> Result<Vec<(u32, &'a [u8])>, SectionError> {
    let bad = SectionError::Decode;
    if bytes.len() < 20 {
        return Err(bad("shorter than header and checksum"));
    }
    if bytes[..8] != magic[..] {
        return Err(bad("bad magic"));
    }
    let v = u32_at(bytes, 8).ok_or(bad("truncated header"))?;
    if v != version {
        return Err(SectionError::Version(v));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if u32_at(crc, 0) != Some(crc32fast::hash(body)) {
        return Err(bad("checksum mismatch"));
    }
    let count = u32_at(body, 12).ok_or(bad("truncated header"))?;
    if count > max_tag {
        return Err(bad("too many sections"));
    }
    let mut seen = vec![false; max_tag as usize + 1];
    let mut out = Vec::with_capacity(count as usize);
    let mut off = 16usize;
    for _ in 0..count {
        let tag = u32_at(body, off).ok_or(bad("truncated section header"))?;
        let len = u32_at(body, off + 4).ok_or(bad("truncated section header"))? as usize;
        off += 8;
        let payload = off
            .checked_add(len)
            .and_then(|end| body.get(off..end))
            .ok_or(bad("section runs past the end"))?;
        off += len;
        let slot = seen
            .get_mut(tag as usize)
            .filter(|_| tag != 0)
            .ok_or(bad("unknown section tag"))?;
        if std::mem::replace(slot, true) {
            return Err(bad("duplicate section"));
        }
        out.push((tag, payload));
    }
    if off != body.len() {
        return Err(bad("trailing bytes after the last section"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: [u8; 8] = *b"TESTBLOB";

    #[test]
    fn round_trip_and_every_damage_is_an_error() {
        let b = encode(&M, 3, &[(1, b"abc"), (2, b""), (5, &[9u8; 40])]);
        let s = decode(&b, &M, 3, 5).unwrap();
        assert_eq!(
            s,
            vec![(1, &b"abc"[..]), (2, &b""[..]), (5, &[9u8; 40][..])]
        );
        assert_eq!(decode(&b, &M, 4, 5), Err(SectionError::Version(3)));
        assert!(decode(&b, b"OTHERBLB", 3, 5).is_err());
        assert!(decode(&b, &M, 3, 4).is_err(), "tag above max");
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode(&c, &M, 3, 5).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(decode(&b[..n], &M, 3, 5).is_err(), "truncated to {n}");
        }
        let dup = encode(&M, 3, &[(1, b"a"), (1, b"b")]);
        assert!(decode(&dup, &M, 3, 5).is_err());
    }
}
