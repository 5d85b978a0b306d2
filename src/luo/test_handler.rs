//! A handler for `/dev/liveupdate-test` files, to test the LUO core itself (upstream has
//! CONFIG_LIVEUPDATE_TEST for the same purpose). Its freeze and can_finish can be told to fail.

use crate::abi::errno::{Errno, SysResult};
use crate::fs::{FileId, TestFile};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::{PhysRead, PAGE_SIZE};

use super::{FileArgs, FileHandler};

pub const COMPATIBLE: &str = "liveupdate-test-v1";

pub struct TestHandler;

impl FileHandler<Host> for TestHandler {
    fn compatible(&self) -> &'static str {
        COMPATIBLE
    }

    fn can_preserve(&self, host: &Host, file: FileId) -> bool {
        matches!(host.files.kind(file), Some(FileKind::Test(_)))
    }

    fn preserve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let v = match a.file.and_then(|f| host.files.kind(f)) {
            Some(FileKind::Test(t)) => t.value,
            _ => return Err(Errno::EINVAL),
        };
        let f = host.kho.alloc_preserve(&mut host.mm, 8)?;
        host.mm.ram.write_u64(f.pa(), v)?;
        a.serialized = f.pa();
        a.private = Some(Box::new(f));
        Ok(())
    }

    fn unpreserve(&self, host: &mut Host, a: &mut FileArgs) {
        if let Some(f) = a
            .private
            .take()
            .and_then(|p| p.downcast::<crate::mm::Folio>().ok())
        {
            let _ = host.kho.unpreserve_free(&mut host.mm, *f);
        }
    }

    fn freeze(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        match a.file.and_then(|f| host.files.kind(f)) {
            Some(FileKind::Test(TestFile {
                fail_freeze: Some(e),
                ..
            })) => Err(Errno(*e)),
            _ => Ok(()),
        }
    }

    fn retrieve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        if a.serialized % PAGE_SIZE != 0 || !host.kho.is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let v = host.mm.ram.read_u64(a.serialized)?;
        host.kho
            .restore_free(&mut host.mm, a.serialized)
            .map_err(|_| Errno::EIO)?;
        a.file = Some(host.files.install(FileKind::Test(TestFile {
            value: v,
            ..Default::default()
        })));
        Ok(())
    }

    fn can_finish(&self, host: &Host, a: &FileArgs) -> bool {
        !matches!(
            a.file.and_then(|f| host.files.kind(f)),
            Some(FileKind::Test(TestFile {
                block_finish: true,
                ..
            }))
        )
    }

    fn finish(&self, host: &mut Host, a: &mut FileArgs) {
        if a.retrieve_status == 0 {
            let _ = host.kho.restore_free(&mut host.mm, a.serialized);
        }
    }
}
