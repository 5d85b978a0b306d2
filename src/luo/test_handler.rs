//! A handler for `/dev/liveupdate-test` files, to test the LUO core itself (upstream has
//! CONFIG_LIVEUPDATE_TEST for the same purpose). Its freeze and can_finish can be told to fail.

use super::{FileId, TestFile};
use crate::abi::errno::{Errno, SysResult};
use crate::mm::{PhysRead, PAGE_SIZE};

use super::{FileArgs, FileHandler, LuoCtx};

/// The test handler's compatible string.
pub const COMPATIBLE: &str = "liveupdate-test-v1";

/// The LUO file handler for `/dev/liveupdate-test` files: preserves [`TestFile::value`].
pub struct TestHandler;

/// What the test handler needs of its context besides [`LuoCtx`]: the test files of the file
/// table.
pub trait TestLuoCtx: LuoCtx {
    /// The test file `file`, if it is one.
    fn test_file(&self, file: FileId) -> Option<&TestFile>;
    /// Install a test file: a new file with one reference.
    fn install_test_file(&mut self, t: TestFile) -> FileId;
}

impl<C: TestLuoCtx + ?Sized> FileHandler<C> for TestHandler {
    fn compatible(&self) -> &'static str {
        COMPATIBLE
    }

    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        host.test_file(file).is_some()
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let v = match a.file.and_then(|f| host.test_file(f)) {
            Some(t) => t.value,
            None => return Err(Errno::EINVAL),
        };
        let (kho, mm) = host.kho_mm();
        let f = kho.alloc_preserve(mm, 8)?;
        mm.ram.write_u64(f.pa(), v)?;
        a.serialized = f.pa();
        a.private = Some(Box::new(f));
        Ok(())
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        if let Some(f) = a
            .private
            .take()
            .and_then(|p| p.downcast::<crate::mm::Folio>().ok())
        {
            let (kho, mm) = host.kho_mm();
            let _ = kho.unpreserve_free(mm, *f);
        }
    }

    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        match a.file.and_then(|f| host.test_file(f)) {
            Some(TestFile {
                fail_freeze: Some(e),
                ..
            }) => Err(Errno(*e)),
            _ => Ok(()),
        }
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if a.serialized % PAGE_SIZE != 0 || !host.kho().is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let v = host.mm().ram.read_u64(a.serialized)?;
        let (kho, mm) = host.kho_mm();
        kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
        a.file = Some(host.install_test_file(TestFile {
            value: v,
            ..Default::default()
        }));
        Ok(())
    }

    fn can_finish(&self, host: &C, a: &FileArgs) -> bool {
        !matches!(
            a.file.and_then(|f| host.test_file(f)),
            Some(TestFile {
                block_finish: true,
                ..
            })
        )
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status == 0 {
            let (kho, mm) = host.kho_mm();
            let _ = kho.restore_free(mm, a.serialized);
        }
    }
}
