//! The `kexec-metadata` subtree: which image we came from and how many kexecs preceded us.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::cstr_field;
use crate::abi::kho::{KexecMetadata, KEXEC_METADATA_VERSION, RELEASE_LEN};

use super::KhoError;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KexecInfo {
    pub previous_release: String,
    pub kexec_count: u32,
}

pub fn encode(release: &str, count: u32) -> Vec<u8> {
    let mut rel = [0u8; RELEASE_LEN];
    let n = release.len().min(RELEASE_LEN - 1);
    rel[..n].copy_from_slice(&release.as_bytes()[..n]);
    KexecMetadata {
        version: KEXEC_METADATA_VERSION,
        previous_release: rel,
        kexec_count: count,
    }
    .as_bytes()
    .to_vec()
}

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
    if version != KEXEC_METADATA_VERSION {
        return Err(KhoError::BadHandover(format!(
            "kexec-metadata version {version} is not supported (this image reads {KEXEC_METADATA_VERSION})"
        )));
    }
    let rel = m.previous_release;
    let previous_release = cstr_field(&rel)
        .ok_or_else(|| KhoError::BadHandover("kexec-metadata release is not a C string".into()))?;
    Ok(KexecInfo {
        previous_release,
        kexec_count: m.kexec_count,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let b = super::encode("handover 0.1.0", 7);
        let i = super::decode(&b).unwrap();
        assert_eq!(
            (i.previous_release.as_str(), i.kexec_count),
            ("handover 0.1.0", 7)
        );
        assert!(super::decode(&b[..10]).is_err());
    }
}
