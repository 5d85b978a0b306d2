//! The scenario's options (`--init-arg key=value`), their limits, and the state stage 1 hands
//! to stage 2 (the options again, read back and checked like the command line, and what stage 1
//! measured).

use crate::init::parse_args;
use crate::kexec::params::parse_size;

/// Scenario options (`--init-arg key=value`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Size of the guest_memfd in bytes (`guest-mem`, default 16 MiB).
    pub guest_mem: u64,
    /// Bytes of the pattern the guest writes and verifies from the start of the guest_memfd
    /// (`data`, default 5 MiB).
    pub data: u64,
    /// Retrieve the guest_memfd before the VM.
    pub gmem_first: bool,
    /// Retrieve the vCPU before the VM and the guest_memfd (`order=vcpu-first`; with
    /// `vcpu_luo`): the vCPU handler retrieves its VM through the cross-file API.
    #[serde(default)]
    pub vcpu_first: bool,
    /// Preserve the vCPU fd itself (`vcpu=kernel`, the `kvm_vcpu_luo_v1` handler saves and
    /// restores its state) instead of saving the state in the VMM into a preserved memfd
    /// (`vcpu=vmm`, the default: the RFC's flow).
    #[serde(default)]
    pub vcpu_luo: bool,
    /// Give the VM an in-kernel irqchip, PIT and GSI routing (`irqchip=1`) before its vCPU:
    /// the vCPU then has an in-kernel LAPIC, and `kvm_vm_luo_v2` carries all of it.
    #[serde(default)]
    pub irqchip: bool,
    /// Do not preserve the VM file: the kexec must be refused and the guest keep running.
    pub no_vm: bool,
    /// In stage 2, retrieve only the guest_memfd and FINISH before retrieving the VM file.
    pub finish_early: bool,
    /// fallocate the data range before the guest runs (no demand faults).
    pub prefault: bool,
    /// fallocate the whole guest_memfd: a fully populated guest (the benchmark).
    pub populate: bool,
    /// With `populate` (`populate=write`): the host also writes the guest's pattern into every
    /// page through the VMM's mapping, so every page of the guest's memory holds data (the
    /// RAM memfd has every page resident), not just an allocated frame.
    #[serde(default)]
    pub populate_write: bool,
    /// Instead of a live update, the baseline without one: snapshot guest memory and vCPU
    /// state to a file in this directory, tear the VM down, build a new one and load it back.
    pub snapshot_dir: Option<String>,
    /// Bind at most this much of the guest_memfd as the guest's memslot (huge guest_memfds
    /// are then preserved and handed over whole while the guest sees the first part).
    pub slot_max: u64,
    /// The guest_memfd is bound as memslots of this size (see `vmm::slots`).
    pub slot_chunk: u64,
    /// After the update, bind only the first chunk before resuming (the rest lazily).
    pub lazy_slots: bool,
    /// ... and the rest from a background thread (else only on the guest's first access).
    pub background_slots: bool,
    /// Live updates in a row (the soak test): after each one the same guest writes its data
    /// again and the host updates again.
    pub cycles: u32,
    /// A software-protected VM whose guest_memfd starts private (see `private`).
    #[serde(default)]
    pub private: bool,
    /// With `private`: the bytes at the start converted to shared after the guest wrote
    /// (`shared`, default 1 MiB).
    #[serde(default)]
    pub shared: u64,
    /// With `private`: a HugeTLB guest_memfd of folios of this order (`huge`, 9 or 18; 0:
    /// 4 KiB pages), from the host's `--hugepages` pool.
    #[serde(default)]
    pub huge: u32,
    /// Populate the guest_memfd the way a long-running host would (`fragment=SEED`): churn
    /// first, then every page faulted in a seeded random order, interleaved with the faults
    /// of other guests (see `vmm::rfc::fragment`). Implies `populate`.
    #[serde(default)]
    pub fragment: Option<u64>,
    /// With `fragment`: guests faulting in turn, the benchmark's included (`fragment-guests`,
    /// default 4).
    #[serde(default)]
    pub fragment_guests: u32,
    /// With `fragment`: bytes of the other guests together (`fragment-other`, default
    /// guest-mem / 32).
    #[serde(default)]
    pub fragment_other: u64,
    /// With `fragment`: bytes the churn allocates before the guests fault, about half of them
    /// freed again (`fragment-churn`, default guest-mem / 64).
    #[serde(default)]
    pub fragment_churn: u64,
}

impl Options {
    /// The guest's mode: with `populate=write` the host has written the pattern over the whole
    /// guest_memfd, and the guest does not write it again.
    pub fn guest_mode(&self) -> crate::vmm::guest::GuestMode {
        use crate::vmm::guest::GuestMode;
        if self.populate_write {
            GuestMode::RunUpdatePrefilled
        } else {
            GuestMode::RunUpdate
        }
    }

    /// Bytes of the guest_memfd the guest sees as memory: `guest_mem`, capped by `slot_max`.
    pub fn slot_size(&self) -> u64 {
        self.guest_mem.min(self.slot_max)
    }
}

impl Options {
    /// Parse `--init-arg key=value` pairs and check them against the limits (see
    /// `validate`); unknown keys are ignored.
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let a = parse_args(args);
        let size = |k: &str, d: u64| a.get(k).map_or(Ok(d), |s| parse_size(s));
        let flag = |k: &str| {
            a.get(k)
                .is_some_and(|v| v.is_empty() || v == "1" || v == "true")
        };
        let o = Options {
            guest_mem: size("guest-mem", 16 << 20)?,
            data: size("data", 5 << 20)?,
            gmem_first: a.get("order").is_some_and(|v| v == "gmem-first"),
            vcpu_first: a.get("order").is_some_and(|v| v == "vcpu-first"),
            vcpu_luo: match a.get("vcpu").map(String::as_str) {
                None | Some("vmm") => false,
                Some("kernel") => true,
                Some(v) => return Err(format!("vcpu={v:?}: vmm or kernel")),
            },
            no_vm: flag("no-vm"),
            irqchip: flag("irqchip"),
            finish_early: flag("finish-early"),
            prefault: flag("prefault"),
            populate: flag("populate") || a.get("populate").is_some_and(|v| v == "write"),
            populate_write: a.get("populate").is_some_and(|v| v == "write"),
            snapshot_dir: a.get("snapshot-dir").cloned(),
            slot_max: size("slot-max", u64::MAX)?,
            slot_chunk: size("slot-chunk", 0)?,
            lazy_slots: a.get("lazy-slots").is_none_or(|v| v != "0"),
            background_slots: a.get("background-slots").is_none_or(|v| v != "0"),
            cycles: a.get("cycles").and_then(|v| v.parse().ok()).unwrap_or(1),
            private: flag("private"),
            shared: size("shared", 1 << 20)?,
            huge: a
                .get("huge")
                .map_or(Ok(0), |v| v.parse().map_err(|_| format!("huge={v:?}")))?,
            fragment: a
                .get("fragment")
                .map(|v| v.parse().map_err(|_| format!("fragment={v:?}")))
                .transpose()?,
            fragment_guests: a.get("fragment-guests").map_or(Ok(4), |v| {
                v.parse().map_err(|_| format!("fragment-guests={v:?}"))
            })?,
            fragment_other: 0,
            fragment_churn: 0,
        };
        let guest_mem = o.guest_mem;
        let o = Options {
            fragment_other: size("fragment-other", guest_mem / 32 / 4096 * 4096)?,
            fragment_churn: size("fragment-churn", guest_mem / 64 / 4096 * 4096)?,
            populate: o.populate || o.fragment.is_some(),
            ..o
        };
        let mut o = o;
        if !a.contains_key("slot-chunk") {
            o.slot_chunk = auto_chunk(o.slot_size());
        }
        Ok(o)
    }

    /// The limits every option set must keep, checked when parsed from the command line and
    /// again when read back from the state memfd after the update (handed-over bytes are input
    /// like any other): the sizes bound what the VMM allocates (`data` bytes to verify, one
    /// flag per memslot chunk) and must fit the host's RAM and KVM's memslots.
    pub fn validate(&self, ram_size: u64) -> Result<(), String> {
        if self.vcpu_first && !self.vcpu_luo {
            return Err("order=vcpu-first needs vcpu=kernel".into());
        }
        if self.guest_mem == 0 || self.guest_mem % 4096 != 0 || self.guest_mem > MAX_GUEST_MEM {
            return Err(format!(
                "guest-mem ({}) must be page aligned and 4K..={MAX_GUEST_MEM}",
                self.guest_mem
            ));
        }
        if self.data == 0 || self.data > self.slot_size() || self.data > ram_size {
            return Err(format!(
                "data ({}) must be 1..=guest-mem ({}), within slot-max ({}) and RAM ({ram_size})",
                self.data, self.guest_mem, self.slot_max
            ));
        }
        if self.private
            && (self.shared == 0
                || self.shared % 4096 != 0
                || self.shared > self.data
                || self.shared >= self.guest_mem)
        {
            return Err(format!(
                "shared ({}) must be page aligned, 4K..=data ({}) and below guest-mem",
                self.shared, self.data
            ));
        }
        if self.huge != 0
            && (!self.private
                || !crate::mm::hugetlb::HUGE_ORDERS.contains(&self.huge)
                || self.guest_mem % (4096 << self.huge) != 0)
        {
            return Err(format!(
                "huge={} needs private=1, an order of 9 or 18, and guest-mem a multiple of it",
                self.huge
            ));
        }
        if self.fragment.is_some()
            && (self.private
                || !(1..=MAX_FRAGMENT_GUESTS).contains(&self.fragment_guests)
                || self.fragment_other % 4096 != 0
                || self.fragment_other > ram_size
                || self.fragment_churn > ram_size
                || self.guest_mem > ram_size)
        {
            return Err(format!(
                "fragment needs a shared guest_memfd within RAM, fragment-guests 1..={MAX_FRAGMENT_GUESTS} \
                 and fragment-other (page aligned) and fragment-churn within RAM ({ram_size})"
            ));
        }
        let chunk = self.slot_chunk.max(4096);
        let chunks = self.slot_size().div_ceil(chunk);
        if chunks > MAX_CHUNKS {
            return Err(format!(
                "slot-chunk ({}) cuts {} bytes into {chunks} memslots, more than {MAX_CHUNKS}",
                self.slot_chunk,
                self.slot_size()
            ));
        }
        Ok(())
    }
}

/// Smallest memslot chunk chosen by default: KVM's cost to create a memslot grows with its
/// size (the reverse maps of this shadow-paging KVM, ~0.4 ms per GiB), and the first chunk is
/// bound inside the blackout.
pub const MIN_AUTO_CHUNK: u64 = 64 << 20;

/// The default chunk for `slot` bytes of guest memory: `MIN_AUTO_CHUNK`, or the power of two
/// that keeps the slot within 16,384 memslots (half of KVM's limit) for larger guests.
pub fn auto_chunk(slot: u64) -> u64 {
    slot.div_ceil(16_384)
        .next_power_of_two()
        .max(MIN_AUTO_CHUNK)
}

/// Most guests `fragment` interleaves (the benchmark's included).
pub const MAX_FRAGMENT_GUESTS: u32 = 16;
/// Largest guest_memfd the scenario takes (the benchmark's metadata-only points reach 1 TiB).
pub const MAX_GUEST_MEM: u64 = 1 << 46;
/// Most memslots the guest_memfd is cut into: KVM's x86 limit of user memslots (32764), less
/// slot 0 for low memory.
pub const MAX_CHUNKS: u64 = 32_763;

/// Stage 2's options: the state stage 1 wrote, parsed and checked like the command line.
pub(super) fn read_stage_state(text: &[u8], ram_size: u64) -> Result<StageState, String> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let ss: StageState =
        serde_json::from_slice(&text[..end]).map_err(|err| format!("state: {err}"))?;
    ss.opts
        .validate(ram_size)
        .map_err(|m| format!("state: options: {m}"))?;
    Ok(ss)
}

/// What stage 1 hands to stage 2 in the state memfd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct StageState {
    pub(super) opts: Options,
    pub(super) pause_ns: u64,
    pub(super) paused_at_ns: u64,
    pub(super) preserve_us: f64,
    pub(super) pause_us: f64,
    pub(super) save_us: f64,
    pub(super) preserved_folios: u64,
    /// The guest's read pass over all of its data before the update, µs (see `GuestIo`).
    #[serde(default)]
    pub(super) touch_before_us: f64,
    /// Run-length distribution of the guest_memfd's frames when it was preserved.
    #[serde(default)]
    pub(super) gmem_runs: Option<crate::mm::fragment::RunStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_chunk_keeps_the_first_memslot_small_and_the_count_within_kvm() {
        assert_eq!(auto_chunk(16 << 20), MIN_AUTO_CHUNK);
        assert_eq!(auto_chunk(16 << 30), MIN_AUTO_CHUNK);
        assert_eq!(auto_chunk(1 << 40), 64 << 20);
        assert_eq!(auto_chunk(1 << 46), 4 << 30);
        for size in [4096u64, 1 << 30, (1 << 40) + 4096, 1 << 46] {
            let o = Options::parse(&args(&[&format!("guest-mem={size}"), "data=4K"])).unwrap();
            assert!(o.slot_size().div_ceil(o.slot_chunk) <= 16_384, "{size}");
            assert_eq!(o.validate(u64::MAX), Ok(()), "{size}");
        }
        let o = Options::parse(&args(&["guest-mem=1G", "data=4K", "slot-chunk=1M"])).unwrap();
        assert_eq!(o.slot_chunk, 1 << 20);
    }

    #[test]
    fn options_are_validated() {
        let ram = 1 << 30;
        let ok = Options::parse(&args(&["guest-mem=16M", "data=5M"])).unwrap();
        assert_eq!(ok.validate(ram), Ok(()));
        for bad in [
            &["guest-mem=16M", "data=0"][..],
            &["guest-mem=16M", "data=17M"],
            &["guest-mem=4097", "data=1"],
            &["guest-mem=128T", "data=1M"],
            &["guest-mem=16M", "data=8M", "slot-max=4M"],
            &["guest-mem=2G", "data=2G"],
            &["guest-mem=1T", "data=1M", "slot-chunk=4K"],
        ] {
            let o = Options::parse(&args(bad)).unwrap();
            assert!(o.validate(ram).is_err(), "{bad:?} accepted");
        }
    }

    /// The options stage 1 hands over are input to stage 2: sizes that would make it allocate
    /// without bound are refused before anything is allocated.
    #[test]
    fn stage_state_read_back_is_validated() {
        let ram = 1 << 30;
        let o = Options::parse(&args(&["guest-mem=16M", "data=5M"])).unwrap();
        let ss = StageState {
            opts: o,
            pause_ns: 0,
            paused_at_ns: 0,
            preserve_us: 0.0,
            pause_us: 0.0,
            save_us: 0.0,
            preserved_folios: 0,
            touch_before_us: 0.0,
            gmem_runs: None,
        };
        let mut text = serde_json::to_vec(&ss).unwrap();
        text.extend_from_slice(&[0; 16]);
        assert!(read_stage_state(&text, ram).is_ok());
        let patch = |f: &dyn Fn(&mut Options)| {
            let mut s = ss.clone();
            f(&mut s.opts);
            serde_json::to_vec(&s).unwrap()
        };
        for (what, t) in [
            ("huge data", patch(&|o| o.data = u64::MAX)),
            (
                "data beyond RAM",
                patch(&|o| {
                    o.guest_mem = 1 << 40;
                    o.data = 1 << 39
                }),
            ),
            ("huge guest_mem", patch(&|o| o.guest_mem = !4095u64)),
            (
                "chunks",
                patch(&|o| {
                    o.guest_mem = 1 << 40;
                    o.slot_chunk = 0
                }),
            ),
            ("zero data", patch(&|o| o.data = 0)),
            (
                "fragment guests",
                patch(&|o| {
                    o.fragment = Some(1);
                    o.fragment_guests = 1000
                }),
            ),
            (
                "fragment churn",
                patch(&|o| {
                    o.fragment = Some(1);
                    o.fragment_guests = 4;
                    o.fragment_churn = u64::MAX
                }),
            ),
        ] {
            let r = read_stage_state(&t, ram);
            assert!(
                r.as_ref().is_err_and(|m| m.contains("options")),
                "{what}: {:?}",
                r.map(|s| s.opts)
            );
        }
        assert!(read_stage_state(b"{not json", ram).is_err());
    }
}
