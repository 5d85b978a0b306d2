//! The host as the context of its LUO file handlers: [`LuoCtx`] and the narrow traits each
//! subsystem's handler asks for, served from the host's file table, KHO and memory.

use crate::abi::errno::SysResult;
use crate::abi::vm_state::VmState;
use crate::fs::memfd_luo::MemfdLuoCtx;
use crate::fs::{FileId, Memfd};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kho::Kho;
use crate::kvm::guest_memfd_luo::GuestMemfdLuoCtx;
use crate::kvm::vcpu::VcpuState;
use crate::kvm::vm_luo::VmLuoCtx;
use crate::kvm::{GuestMemfd, VcpuFile, VmFile};
use crate::luo::{LuoCtx, SessionId};
use crate::mm::Mm;

impl LuoCtx for Host {
    fn kho(&self) -> &Kho {
        &self.kho
    }

    fn kho_mut(&mut self) -> &mut Kho {
        &mut self.kho
    }

    fn mm(&self) -> &Mm {
        &self.mm
    }

    fn mm_mut(&mut self) -> &mut Mm {
        &mut self.mm
    }

    fn kho_mm(&mut self) -> (&mut Kho, &mut Mm) {
        (&mut self.kho, &mut self.mm)
    }

    fn luo_get_token_outgoing(&self, sid: SessionId, file: FileId) -> SysResult<u64> {
        Host::luo_get_token_outgoing(self, sid, file)
    }

    fn luo_get_file_incoming(&mut self, sid: SessionId, token: u64) -> SysResult<FileId> {
        Host::luo_get_file_incoming(self, sid, token)
    }

    fn fput(&mut self, file: FileId) {
        Host::fput(self, file)
    }
}

impl MemfdLuoCtx for Host {
    fn memfd(&self, file: FileId) -> Option<&Memfd> {
        match self.files.kind(file) {
            Some(FileKind::Memfd(m)) => Some(m),
            _ => None,
        }
    }

    fn memfd_mm(&mut self, file: FileId) -> Option<(&mut Memfd, &mut Mm)> {
        match self.files.kind_mut(file) {
            Some(FileKind::Memfd(m)) => Some((m, &mut self.mm)),
            _ => None,
        }
    }

    fn file_pos(&self, file: FileId) -> Option<u64> {
        self.files.get(file).map(|f| f.pos)
    }

    fn install_memfd(&mut self, m: Memfd, pos: u64) -> FileId {
        let file = self.files.install(FileKind::Memfd(m));
        if let Some(f) = self.files.get_mut(file) {
            f.pos = pos;
        }
        file
    }

    fn map_file_pages(&mut self, file: FileId, indexes: &[u64]) {
        Host::map_file_pages(self, file, indexes)
    }
}

impl VmLuoCtx for Host {
    fn vm_file(&self, file: FileId) -> Option<&VmFile> {
        match self.files.kind(file) {
            Some(FileKind::Vm(v)) => Some(v),
            _ => None,
        }
    }

    fn create_restored_vm(&mut self, state: &VmState) -> SysResult<FileId> {
        self.kvm_create_restored_vm(state)
    }

    fn vm_save(&self, file: FileId) -> SysResult<VmState> {
        self.kvm_vm_save(file)
    }

    fn vm_luo_v1(&self) -> bool {
        self.params.vm_luo_v1
    }

    fn vcpu_file(&self, file: FileId) -> Option<&VcpuFile> {
        match self.files.kind(file) {
            Some(FileKind::Vcpu(v)) => Some(v),
            _ => None,
        }
    }

    fn create_restored_vcpu(&mut self, vm: FileId, id: u64, state: VcpuState) -> SysResult<FileId> {
        self.kvm_create_vcpu_file(vm, id, Some(state))
    }

    fn take_vcpu_snapshot(&mut self, file: FileId) -> Option<Result<Vec<u8>, String>> {
        Host::take_vcpu_snapshot(self, file)
    }
}

impl GuestMemfdLuoCtx for Host {
    fn guest_memfd(&self, file: FileId) -> Option<&GuestMemfd> {
        match self.files.kind(file) {
            Some(FileKind::GuestMemfd(g)) => Some(g),
            _ => None,
        }
    }

    fn guest_memfd_mut(&mut self, file: FileId) -> Option<&mut GuestMemfd> {
        match self.files.kind_mut(file) {
            Some(FileKind::GuestMemfd(g)) => Some(g),
            _ => None,
        }
    }

    fn create_guest_memfd(&mut self, vm: FileId, size: u64, flags: u64) -> SysResult<FileId> {
        self.gmem_create(vm, size, flags)
    }

    fn adopt_huge_folio(&mut self, folio: crate::mm::Folio) -> SysResult<()> {
        let (pool, mm) = self.hugepool_mm();
        pool.adopt(mm, folio).map_err(Into::into)
    }

    fn create_guest_memfd_order(
        &mut self,
        vm: FileId,
        size: u64,
        flags: u64,
        page_order: u32,
    ) -> SysResult<FileId> {
        self.gmem_create_order(vm, size, flags, page_order)
    }

    fn gmem_luo_v1(&self) -> bool {
        self.params.gmem_luo_v1
    }
}

/// Test hook: the `/dev/liveupdate-test` files.
#[cfg(feature = "test-hooks")]
impl crate::luo::test_handler::TestLuoCtx for Host {
    fn test_file(&self, file: FileId) -> Option<&crate::fs::TestFile> {
        match self.files.kind(file) {
            Some(FileKind::Test(t)) => Some(t),
            _ => None,
        }
    }

    fn install_test_file(&mut self, t: crate::fs::TestFile) -> FileId {
        self.files.install(FileKind::Test(t))
    }
}
