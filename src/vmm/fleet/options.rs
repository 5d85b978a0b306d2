//! The fleet's options (`--init-arg key=value`), their limits, and the state each image hands
//! to the next (the options again, checked like the command line, and when each VM paused).

use crate::init::parse_args;
use crate::kexec::params::parse_size;
use crate::vmm::guest::{MAX_SMP_VCPUS, PAGE_SIZE};

/// Most VMs one fleet runs.
pub const MAX_VMS: u32 = 64;

/// What the fleet runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// VMs, `1..=MAX_VMS`.
    pub vms: u32,
    /// vCPUs per VM, `1..=MAX_SMP_VCPUS`.
    pub vcpus: u32,
    /// Size of each VM's guest_memfd.
    pub guest_mem: u64,
    /// Bytes each VM's guest writes, shared among its vCPUs; VM `i` takes entry `i % len`
    /// (mixed sizes).
    pub data: Vec<u64>,
    /// An in-kernel irqchip (PIC, IOAPIC, LAPICs), PIT and routing in every VM.
    pub irqchip: bool,
    /// Updates in a row; the guests keep running between them and verify after the last.
    pub cycles: u32,
    /// Threads that retrieve and resume VMs after an update (0: one per CPU).
    pub workers: u32,
    /// How long a vCPU that asks whether to proceed waits for the answer (µs): the guest is
    /// idle that long, as a halted vCPU waits for its next timer tick.
    pub idle_us: u64,
    /// How long the guests run between an update and the next (ms).
    pub run_ms: u64,
    /// Retrieve each VM's vCPUs (last first) before its VM and memory: the vCPU handler then
    /// finds the VM through the cross-file API (`order=vcpus-first`; default `vm-first`).
    #[serde(default)]
    pub vcpus_first: bool,
    /// With an irqchip, send each VM's first vCPU an interrupt at every update's pause, which
    /// its guest must take after the update (`pending-irq=0` turns it off).
    #[serde(default)]
    pub pending_irq: bool,
    /// After an update, bind each VM's guest_memfd only once every VM runs again (or at the
    /// guest's first access to it), instead of before its resume (`bind=lazy`, the default;
    /// `bind=eager`).
    #[serde(default)]
    pub lazy_bind: bool,
}

impl Options {
    /// Parse `--init-arg` values: `vms=N vcpus=M guest-mem=SIZE data=SIZE[,SIZE...]
    /// irqchip=0|1 cycles=N workers=N idle-us=N run-ms=N order=vm-first|vcpus-first
    /// pending-irq=0|1 bind=lazy|eager`.
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let a = parse_args(args);
        let num = |k: &str, d: u64| {
            a.get(k)
                .map_or(Ok(d), |v| v.parse().map_err(|_| format!("{k}={v:?}")))
        };
        let small = |k: &str, d: u32| {
            a.get(k)
                .map_or(Ok(d), |v| v.parse().map_err(|_| format!("{k}={v:?}")))
        };
        let data = a
            .get("data")
            .map_or("4M", String::as_str)
            .split(',')
            .map(parse_size)
            .collect::<Result<Vec<u64>, String>>()?;
        Ok(Options {
            vms: small("vms", 1)?,
            vcpus: small("vcpus", 2)?,
            guest_mem: a.get("guest-mem").map_or(Ok(64 << 20), |v| parse_size(v))?,
            data,
            irqchip: a.get("irqchip").is_none_or(|v| v != "0"),
            cycles: small("cycles", 1)?,
            workers: small("workers", 0)?,
            idle_us: num("idle-us", 1000)?,
            run_ms: num("run-ms", 100)?,
            pending_irq: a.get("pending-irq").is_none_or(|v| v != "0"),
            lazy_bind: match a.get("bind").map(String::as_str) {
                None | Some("lazy") => true,
                Some("eager") => false,
                Some(v) => return Err(format!("bind={v:?}: lazy or eager")),
            },
            vcpus_first: match a.get("order").map(String::as_str) {
                None | Some("vm-first") => false,
                Some("vcpus-first") => true,
                Some(v) => return Err(format!("order={v:?}: vm-first or vcpus-first")),
            },
        })
    }

    /// Check the limits against the host's RAM: every VM's data must fit at once.
    pub fn validate(&self, ram_size: u64) -> Result<(), String> {
        if !(1..=MAX_VMS).contains(&self.vms) {
            return Err(format!("vms={}: 1..={MAX_VMS}", self.vms));
        }
        if !(1..=MAX_SMP_VCPUS).contains(&self.vcpus) {
            return Err(format!("vcpus={}: 1..={MAX_SMP_VCPUS}", self.vcpus));
        }
        if self.guest_mem == 0
            || self.guest_mem % PAGE_SIZE != 0
            || self.guest_mem > super::MAX_GUEST_MEM
        {
            return Err(format!(
                "guest-mem={}: page aligned, 4K..={}",
                self.guest_mem,
                super::MAX_GUEST_MEM
            ));
        }
        let page_each = u64::from(self.vcpus) * PAGE_SIZE;
        if self.data.is_empty()
            || self.data.len() > MAX_VMS as usize
            || self
                .data
                .iter()
                .any(|&d| d < page_each || d > self.guest_mem)
        {
            return Err(format!(
                "data: 1..={MAX_VMS} sizes, each at least a page per vCPU and at most guest-mem ({})",
                self.guest_mem
            ));
        }
        let total: u64 = (0..self.vms).map(|i| self.data_of(i)).sum();
        if total > ram_size / 4 * 3 {
            return Err(format!(
                "the VMs' data ({total} bytes) must fit in 3/4 of RAM ({ram_size})"
            ));
        }
        if !(1..=1000).contains(&self.cycles)
            || self.workers > 64
            || self.idle_us > 100_000
            || self.run_ms > 600_000
        {
            return Err(
                "cycles 1..=1000, workers ..=64, idle-us ..=100000, run-ms ..=600000".into(),
            );
        }
        Ok(())
    }

    /// Bytes VM `i` writes.
    pub fn data_of(&self, i: u32) -> u64 {
        self.data[i as usize % self.data.len()]
    }

    /// Worker threads for the restore: as asked, else one per CPU, never more than VMs.
    pub fn nr_workers(&self) -> u32 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let w = if self.workers == 0 {
            cpus
        } else {
            self.workers
        };
        w.clamp(1, self.vms.max(1))
    }
}

/// When one VM paused for the update (CLOCK_MONOTONIC ns): its vCPUs were kicked, and all had
/// stopped. Its loop counts at the pause, to check that each vCPU went on from there.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Paused {
    pub pause_ns: u64,
    pub paused_at_ns: u64,
    pub loops: Vec<u64>,
}

/// What one image hands to the next in the fleet's state memfd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageState {
    pub opts: Options,
    /// One entry per VM.
    pub vms: Vec<Paused>,
    /// The pause of every VM, from the first kick to the last vCPU stopped (µs).
    pub pause_all_us: f64,
    /// Preserving every VM's files while the guests ran (µs).
    pub preserve_us: f64,
    /// The guests' TSC frequency (kHz), asked when the first vCPU was built (a running vCPU
    /// cannot be asked, and asking a retrieved one would load its state on the asking thread).
    pub tsc_khz: u32,
}

/// Decode and check the state (`text` may end in zeros: the memfd is larger than the JSON).
pub fn read_stage_state(text: &[u8], ram_size: u64) -> Result<StageState, String> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let ss: StageState =
        serde_json::from_slice(&text[..end]).map_err(|err| format!("state: {err}"))?;
    ss.opts
        .validate(ram_size)
        .map_err(|m| format!("state: options: {m}"))?;
    if ss.vms.len() != ss.opts.vms as usize
        || ss
            .vms
            .iter()
            .any(|v| v.loops.len() != ss.opts.vcpus as usize)
    {
        return Err("state: one pause record per VM, one loop count per vCPU".into());
    }
    Ok(ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_validate() {
        let o = Options::parse(&args(&["vms=8", "vcpus=2", "data=4M,8M", "cycles=2"])).unwrap();
        assert_eq!((o.vms, o.vcpus, o.cycles), (8, 2, 2));
        assert_eq!(
            (o.data_of(0), o.data_of(1), o.data_of(2)),
            (4 << 20, 8 << 20, 4 << 20)
        );
        assert_eq!(o.validate(1 << 30), Ok(()));
        assert!(o.nr_workers() >= 1 && o.nr_workers() <= 8);
        for bad in [
            &["vms=0"][..],
            &["vms=65"],
            &["vcpus=17"],
            &["vcpus=0"],
            &["guest-mem=4097"],
            &["data=1"],
            &["guest-mem=4M", "data=8M"],
            &["vms=64", "guest-mem=1G", "data=1G"],
            &["cycles=0"],
        ] {
            let o = Options::parse(&args(bad)).unwrap();
            assert!(o.validate(1 << 30).is_err(), "{bad:?} accepted");
        }
        assert!(Options::parse(&args(&["vms=x"])).is_err());
        assert!(Options::parse(&args(&["order=random"])).is_err());
        assert!(
            Options::parse(&args(&["order=vcpus-first"]))
                .unwrap()
                .vcpus_first
        );
    }

    #[test]
    fn stage_state_is_checked() {
        let o = Options::parse(&args(&["vms=2", "vcpus=2"])).unwrap();
        let ss = StageState {
            opts: o,
            vms: vec![
                Paused {
                    pause_ns: 1,
                    paused_at_ns: 2,
                    loops: vec![3, 4],
                };
                2
            ],
            pause_all_us: 0.0,
            preserve_us: 0.0,
            tsc_khz: 0,
        };
        let mut text = serde_json::to_vec(&ss).unwrap();
        text.extend_from_slice(&[0; 8]);
        assert!(read_stage_state(&text, 1 << 30).is_ok());
        let mut short = ss.clone();
        short.vms.pop();
        assert!(read_stage_state(&serde_json::to_vec(&short).unwrap(), 1 << 30).is_err());
        let mut huge = ss;
        huge.opts.vms = 1000;
        assert!(read_stage_state(&serde_json::to_vec(&huge).unwrap(), 1 << 30).is_err());
        assert!(read_stage_state(b"{", 1 << 30).is_err());
    }
}
