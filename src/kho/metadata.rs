//! The `kexec-metadata` subtree: which image we came from and how many kexecs preceded us.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::cstr_field;
use crate::abi::kho::{
    KexecMetadata, IMAGE_PATH_LEN, KEXEC_METADATA_V1, KEXEC_METADATA_VERSION, RELEASE_LEN,
};

use super::KhoError;

/// A decoded `kexec-metadata` blob.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KexecInfo {
    /// Version string of the image that wrote it.
    pub previous_release: String,
    /// kexecs since the cold boot, counting the one that handed this blob over.
    pub kexec_count: u32,
    /// Path of the previous image (version 2), for rollback.
    pub previous_image: Option<String>,
}

/// A version-2 blob: `release` (cut to 64 bytes), `count`, and the path `image` (left empty
/// if it does not fit in `IMAGE_PATH_LEN` bytes with its NUL).
pub fn encode(release: &str, count: u32, image: &str) -> Vec<u8> {
    let mut rel = [0u8; RELEASE_LEN];
    let n = release.len().min(RELEASE_LEN - 1);
    rel[..n].copy_from_slice(&release.as_bytes()[..n]);
    let mut v = KexecMetadata {
        version: KEXEC_METADATA_VERSION,
        previous_release: rel,
        kexec_count: count,
    }
    .as_bytes()
    .to_vec();
    let mut path = [0u8; IMAGE_PATH_LEN];
    if image.len() < IMAGE_PATH_LEN {
        path[..image.len()].copy_from_slice(image.as_bytes());
    }
    v.extend_from_slice(&path);
    v
}

/// Decode a version-1 or -2 blob; `BadHandover` if it is short, of another version, or its
/// strings are not NUL-terminated UTF-8.
pub fn decode(bytes: &[u8]) -> Result<KexecInfo, KhoError> {
    let m = KexecMetadata::read_from_prefix(bytes)
        .map_err(|_| {
            KhoError::BadHandover(format!(
                "kexec-metadata is {} bytes, too short",
                bytes.len()
            ))
        })?
        .0;
    let version = m.version;
    if version != KEXEC_METADATA_VERSION && version != KEXEC_METADATA_V1 {
        return Err(KhoError::BadHandover(format!(
            "kexec-metadata version {version} is not supported (this image reads {KEXEC_METADATA_VERSION})"
        )));
    }
    let rel = m.previous_release;
    let previous_release = cstr_field(&rel)
        .ok_or_else(|| KhoError::BadHandover("kexec-metadata release is not a C string".into()))?;
    let previous_image = if version >= 2 {
        let p = bytes.get(73..73 + IMAGE_PATH_LEN).ok_or_else(|| {
            KhoError::BadHandover("kexec-metadata v2 is too short for the image path".into())
        })?;
        cstr_field(p).filter(|s| !s.is_empty())
    } else {
        None
    };
    Ok(KexecInfo {
        previous_release,
        kexec_count: m.kexec_count,
        previous_image,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let b = super::encode("handover 0.1.0", 7, "/usr/bin/handover");
        let i = super::decode(&b).unwrap();
        assert_eq!(
            (i.previous_release.as_str(), i.kexec_count),
            ("handover 0.1.0", 7)
        );
        assert_eq!(i.previous_image.as_deref(), Some("/usr/bin/handover"));
        assert!(super::decode(&b[..10]).is_err());
        assert!(
            super::decode(&b[..80]).is_err(),
            "v2 without its image path"
        );
        // Version 1 (upstream's 73 bytes) still decodes.
        let mut v1 = b[..73].to_vec();
        v1[0] = 1;
        assert_eq!(super::decode(&v1).unwrap().previous_image, None);
    }
}
