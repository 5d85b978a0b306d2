//! The blackout benchmark: real guests through real kexecs of the host image, swept over guest
//! memory sizes, with the snapshot/restore baseline in the same run.
//!
//! Each run is a fresh host image (`handover boot --init gmem-rfc`): a fully populated
//! guest_memfd of the given size (4 KiB folios), a guest writing and later verifying 1 MiB of
//! it while it reads its clock port; preserve while it runs, pause, kexec, retrieve, resume. The
//! guest measures the blackout itself. The baseline runs the same guest through a snapshot to a
//! file and a restore into a new VM, in one host image.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Spread;

/// What a point measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Live update, guest_memfd in our run-list format.
    LiveV2,
    /// Live update, guest_memfd in the RFC's per-folio format.
    LiveV1,
    /// Snapshot to a file and restore into a new VM.
    Snapshot,
    /// The strongest alternative without KHO: a live snapshot on plain KVM (pre-copy with dirty
    /// logging while the guest runs, pause, last dirty pages, exec, lazy restore from a
    /// `MAP_PRIVATE` mapping of the file; `bench::live_snapshot`). The file's page cache
    /// survives our exec (a real kexec would lose it).
    LiveSnapshot,
    /// Live update of a software-protected guest backed by 2 MiB HugeTLB folios
    /// (`guest_memfd_luo_v3`); its first MiB is shared, the rest private.
    LiveHuge2M,
    /// The same with 1 GiB folios.
    LiveHuge1G,
}

impl Kind {
    /// Short name used in reports, CSV and the plot legend ("live-v2", "live-v1", "snapshot").
    pub fn name(self) -> &'static str {
        match self {
            Kind::LiveV2 => "live-v2",
            Kind::LiveV1 => "live-v1",
            Kind::Snapshot => "snapshot",
            Kind::LiveSnapshot => "live-snapshot",
            Kind::LiveHuge2M => "live-v3-2m",
            Kind::LiveHuge1G => "live-v3-1g",
        }
    }

    /// The folio order of a HugeTLB kind (0 for the others).
    pub fn huge_order(self) -> u32 {
        match self {
            Kind::LiveHuge2M => 9,
            Kind::LiveHuge1G => 18,
            _ => 0,
        }
    }
}

/// How a point's guest memory is filled before the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Fill {
    /// Every page holds data: the host writes the guest's pattern into the whole guest_memfd
    /// (`populate=write`), the guest writes it again and verifies all of it after the update.
    Written,
    /// Every page allocated (fallocate) but never written; the guest writes and verifies
    /// `Plan::data` (the sweep before issue 14; still used by the HugeTLB points, whose private
    /// pages the host cannot write).
    #[default]
    Allocated,
    /// A guest_memfd of the full size, bound whole, holding only the `Plan::data` the guest
    /// writes: the rest is never allocated.
    Sparse,
    /// As `Written`, but allocated the way a host that has run for a while allocates: churn,
    /// then several guests faulting in turn in random order (`fragment=SEED`, a new seed per
    /// run; `mm::fragment`).
    Fragmented,
}

impl Fill {
    /// Short name used in tables and CSV.
    pub fn name(self) -> &'static str {
        match self {
            Fill::Written => "written",
            Fill::Allocated => "allocated",
            Fill::Sparse => "sparse",
            Fill::Fragmented => "fragmented",
        }
    }
}

/// One point of a plan: what, at which size, seen how far by the guest, filled how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// What is measured.
    pub kind: Kind,
    /// Size of the guest_memfd, bytes.
    pub size: u64,
    /// Bytes of it bound as the guest's memory.
    pub slot: u64,
    /// How it is filled.
    pub fill: Fill,
}

/// The result of one run (one host image) of a point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// The scenario finished, the guest verified its data and the image exited 0.
    pub ok: bool,
    /// Blackout as the guest measured it, µs.
    pub blackout_us: f64,
    /// Preservation while the guest still runs (phase `preserve_while_running`), µs.
    pub preserve_us: f64,
    /// Handover metadata the old image wrote, bytes.
    pub handover_bytes: f64,
    /// Retrieval of the VM and guest_memfd in the new image (phase `retrieve`), µs.
    pub retrieve_us: f64,
    /// The guest's read pass over all its data before the update (KVM's mappings warm), µs.
    #[serde(default)]
    pub touch_before_us: f64,
    /// The same pass right after the resume (a new VM: every page faults in again), µs.
    #[serde(default)]
    pub touch_after_us: f64,
    /// Every host-side phase the scenario reported, as a JSON object of µs.
    pub phases_us: Value,
    /// Why the run failed (`ok` false).
    pub error: Option<String>,
    /// The live-snapshot baseline's whole result (rounds, bytes written, extra memory, total
    /// update time); null for the other kinds.
    #[serde(default)]
    pub detail: Value,
}

impl Run {
    /// A run that failed with `error`: no figures.
    pub fn failed(error: String) -> Run {
        Run {
            ok: false,
            blackout_us: 0.0,
            preserve_us: 0.0,
            handover_bytes: 0.0,
            retrieve_us: 0.0,
            touch_before_us: 0.0,
            touch_after_us: 0.0,
            phases_us: Value::Null,
            error: Some(error),
            detail: Value::Null,
        }
    }
}

/// One point of the sweep: a kind at a guest size, over all its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// What was measured.
    pub kind: Kind,
    /// Size of the guest_memfd, bytes.
    pub guest_bytes: u64,
    /// Guest sees only the first `slot_bytes` (metadata-only points).
    pub slot_bytes: u64,
    /// How the guest's memory was filled.
    #[serde(default)]
    pub fill: Fill,
    /// Every run, failed ones included.
    pub runs: Vec<Run>,
    /// Spread of [`Run::blackout_us`] over the successful runs.
    pub blackout_us: Spread,
    /// Spread of [`Run::preserve_us`] over the successful runs.
    pub preserve_us: Spread,
    /// Spread of [`Run::retrieve_us`] over the successful runs.
    pub retrieve_us: Spread,
    /// Spread of [`Run::handover_bytes`] over the successful runs.
    pub handover_bytes: Spread,
    /// Spread of [`Run::touch_before_us`].
    #[serde(default)]
    pub touch_before_us: Spread,
    /// Spread of [`Run::touch_after_us`] (the brownout).
    #[serde(default)]
    pub touch_after_us: Spread,
    /// Each host-side phase inside the blackout, median over runs.
    pub phases_median_us: Value,
}

/// What a sweep measures (see [`Plan::points`]).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Guest sizes in bytes, every page written, the guest's memslots covering all of it.
    pub sizes: Vec<u64>,
    /// Guest sizes in bytes of sparse guest_memfds bound whole (only `data` is written).
    pub sparse: Vec<u64>,
    /// Guest sizes in bytes, every page written, allocated fragmented ([`Fill::Fragmented`]).
    pub fragmented: Vec<u64>,
    /// Guest sizes in bytes, fully allocated, whose memslots cover only the first 16 GiB
    /// (live-v2 only; none by default).
    pub metadata_only: Vec<u64>,
    /// Runs per live-update point.
    pub runs: usize,
    /// Runs per snapshot-baseline point (each takes seconds to minutes).
    pub baseline_runs: usize,
    /// Largest guest size (bytes) measured with the eager snapshot baseline.
    pub baseline_max: u64,
    /// Largest guest size (bytes) measured with the live-snapshot baseline.
    pub live_snapshot_max: u64,
    /// Largest guest size (bytes) measured with the RFC's v1 format.
    pub v1_max: u64,
    /// Directory for the baseline's snapshot files.
    pub snapshot_dir: String,
    /// Bytes the guest writes before and verifies after the update at sparse, allocated and
    /// HugeTLB points.
    pub data: u64,
    /// Guest sizes also measured with 2 MiB and 1 GiB HugeTLB folios (`--huge-sizes`).
    pub huge_sizes: Vec<u64>,
    /// Metadata-only sizes with 1 GiB folios (guest sees the first 16 GiB).
    pub huge_metadata_only: Vec<u64>,
}

impl Plan {
    /// The published sweep: 16 MiB to 16 GiB written, sparse 64 GiB to 1 TiB, 20 runs per
    /// live point, 5 per baseline point.
    pub fn full() -> Plan {
        Plan {
            sizes: vec![16 << 20, 256 << 20, 1 << 30, 4 << 30, 16 << 30],
            sparse: vec![64 << 30, 256 << 30, 1 << 40],
            fragmented: vec![1 << 30, 16 << 30],
            metadata_only: vec![],
            runs: 20,
            baseline_runs: 5,
            baseline_max: 4 << 30,
            live_snapshot_max: 16 << 30,
            v1_max: 1 << 30,
            snapshot_dir: "/var/tmp".into(),
            data: 5 << 20,
            huge_sizes: vec![],
            huge_metadata_only: vec![],
        }
    }

    /// A short sweep (16 and 64 MiB, 2 runs) for a quick check.
    pub fn quick() -> Plan {
        Plan {
            sizes: vec![16 << 20, 64 << 20],
            sparse: vec![],
            fragmented: vec![64 << 20],
            metadata_only: vec![],
            runs: 2,
            baseline_runs: 2,
            baseline_max: 64 << 20,
            live_snapshot_max: 64 << 20,
            v1_max: 16 << 20,
            snapshot_dir: "/var/tmp".into(),
            data: 1 << 20,
            huge_sizes: vec![],
            huge_metadata_only: vec![],
        }
    }

    /// Runs of a point of this kind.
    pub fn runs_of(&self, kind: Kind) -> usize {
        match kind {
            Kind::Snapshot | Kind::LiveSnapshot => self.baseline_runs,
            _ => self.runs,
        }
    }

    /// Every point, in the order they run.
    pub fn points(&self) -> Vec<Spec> {
        // Live updates first: the baseline writes whole guests to disk, and the writeback that
        // follows would disturb millisecond measurements.
        let slot_cap = 16u64 << 30;
        let spec = |kind, size, slot, fill| Spec {
            kind,
            size,
            slot,
            fill,
        };
        let mut v = Vec::new();
        for &s in &self.sizes {
            v.push(spec(Kind::LiveV2, s, s, Fill::Written));
            if s <= self.v1_max {
                v.push(spec(Kind::LiveV1, s, s, Fill::Written));
            }
        }
        for &s in &self.fragmented {
            v.push(spec(Kind::LiveV2, s, s, Fill::Fragmented));
        }
        for &s in &self.sparse {
            v.push(spec(Kind::LiveV2, s, s, Fill::Sparse));
        }
        for &s in &self.metadata_only {
            v.push(spec(Kind::LiveV2, s, s.min(slot_cap), Fill::Allocated));
        }
        for &s in &self.huge_sizes {
            if s % (2 << 20) == 0 {
                v.push(spec(Kind::LiveHuge2M, s, s, Fill::Allocated));
            }
            if s % (1 << 30) == 0 {
                v.push(spec(Kind::LiveHuge1G, s, s, Fill::Allocated));
            }
        }
        for &s in &self.huge_metadata_only {
            if s % (1 << 30) == 0 {
                v.push(spec(Kind::LiveHuge1G, s, s.min(slot_cap), Fill::Allocated));
            }
        }
        for &s in &self.sizes {
            if s <= self.live_snapshot_max {
                v.push(spec(Kind::LiveSnapshot, s, s, Fill::Written));
            }
        }
        for &s in &self.sizes {
            if s <= self.baseline_max {
                v.push(spec(Kind::Snapshot, s, s, Fill::Written));
            }
        }
        v
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// One run of one point, in a fresh host image.
pub fn run_one(p: Spec, plan: &Plan) -> Run {
    run_one_seeded(p, plan, 1)
}

/// One run of one point; `seed` (non-zero) picks the allocation order of a fragmented point.
pub fn run_one_seeded(p: Spec, plan: &Plan, seed: u64) -> Run {
    if p.kind == Kind::LiveSnapshot {
        return live_snapshot_run(p.size, plan);
    }
    let Spec {
        kind,
        size,
        slot,
        fill,
    } = p;
    let mut ram = size + (size / 16).max(256 << 20) + (512 << 20);
    if kind == Kind::LiveHuge1G {
        // Room for 1 GiB-aligned folios above the scratch zone and low memory.
        ram = (ram + (1 << 30)).div_ceil(1 << 30) * (1 << 30);
    }
    let mut args = vec![
        "--ram".to_string(),
        ram.to_string(),
        "--init".into(),
        crate::vmm::rfc::PROGRAM.into(),
    ];
    let (populate, data) = match fill {
        Fill::Written => (Some("write"), slot),
        Fill::Allocated => (Some("1"), plan.data.min(slot)),
        Fill::Sparse => (None, plan.data.min(slot)),
        Fill::Fragmented => (Some("write"), slot),
    };
    let mut init = vec![
        format!("guest-mem={size}"),
        format!("data={data}"),
        format!("slot-max={slot}"),
    ];
    if let Some(v) = populate {
        init.push(format!("populate={v}"));
    }
    if fill == Fill::Fragmented {
        init.push(format!("fragment={}", seed.max(1)));
    }
    for a in init {
        args.push("--init-arg".into());
        args.push(a);
    }
    match kind {
        Kind::LiveV1 => args.extend(["--gmem-luo".into(), "v1".into()]),
        Kind::Snapshot => args.extend([
            "--init-arg".into(),
            format!("snapshot-dir={}", plan.snapshot_dir),
        ]),
        Kind::LiveV2 | Kind::LiveSnapshot => {}
        Kind::LiveHuge2M | Kind::LiveHuge1G => {
            let order = kind.huge_order();
            let (name, folio) = if order == 9 {
                ("2M", 2u64 << 20)
            } else {
                ("1G", 1 << 30)
            };
            for a in ["private=1".to_string(), format!("huge={order}")] {
                args.push("--init-arg".into());
                args.push(a);
            }
            args.push(format!("--hugepages={name}:{}", size / folio));
        }
    }
    let failed = Run::failed;
    let (code, events, stderr) = match super::harness::run_host(&args) {
        Ok(x) => x,
        Err(e) => return failed(e),
    };
    let find = |n: &str| events.iter().find(|e| e["event"] == n).cloned();
    let end = match kind {
        Kind::Snapshot => find("rfc-snapshot"),
        _ => find("rfc-stage2"),
    };
    let Some(end) = end.filter(|e| e["ok"] == true && code == 0) else {
        let why = find("rfc-failed")
            .map(|e| e["error"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| format!("exit {code}: {}", stderr.lines().last().unwrap_or("")));
        return failed(why);
    };
    let p = &end["phases_us"];
    Run {
        ok: true,
        blackout_us: f(&end["blackout_us"]),
        preserve_us: f(&p["preserve_while_running"]),
        handover_bytes: f(&end["handover_bytes"]),
        retrieve_us: f(&p["retrieve"]),
        touch_before_us: f(&end["brownout"]["touch_before_us"]),
        touch_after_us: f(&end["brownout"]["touch_after_us"]),
        phases_us: p.clone(),
        error: None,
        detail: Value::Null,
    }
}

/// One run of the live-snapshot baseline, as a sweep run: its "preserve" is the pre-copy, its
/// "handover bytes" the bytes written to the snapshot file.
fn live_snapshot_run(size: u64, plan: &Plan) -> Run {
    let dir = std::path::Path::new(&plan.snapshot_dir);
    match super::live_snapshot::run_point(size, dir) {
        Ok(r) => {
            let ph = &r.phases_us;
            Run {
                ok: r.ok,
                blackout_us: r.blackout_us as f64,
                preserve_us: ph.precopy,
                handover_bytes: r.bytes_written as f64,
                retrieve_us: ph.restore_setup,
                touch_before_us: ph.touch_before,
                touch_after_us: ph.touch_after,
                phases_us: serde_json::to_value(ph)
                    .map(|mut v| {
                        v["total_update"] = r.total_update_us.into();
                        v
                    })
                    .unwrap_or(Value::Null),
                error: (!r.ok).then(|| format!("guest status {}", r.guest_status)),
                detail: serde_json::to_value(&r).unwrap_or(Value::Null),
            }
        }
        Err(e) => Run::failed(e),
    }
}

/// A point from its runs: the spreads are taken over the successful runs only.
pub fn summarize(spec: Spec, runs: Vec<Run>) -> Point {
    let ok: Vec<&Run> = runs.iter().filter(|r| r.ok).collect();
    let sp = |g: fn(&Run) -> f64| Spread::of(&ok.iter().map(|r| g(r)).collect::<Vec<_>>());
    let mut phases = serde_json::Map::new();
    if let Some(Value::Object(first)) = ok.first().map(|r| &r.phases_us) {
        for k in first.keys() {
            let v: Vec<f64> = ok.iter().map(|r| f(&r.phases_us[k])).collect();
            phases.insert(k.clone(), Spread::of(&v).median.into());
        }
    }
    Point {
        kind: spec.kind,
        guest_bytes: spec.size,
        slot_bytes: spec.slot,
        fill: spec.fill,
        touch_before_us: sp(|r| r.touch_before_us),
        touch_after_us: sp(|r| r.touch_after_us),
        blackout_us: sp(|r| r.blackout_us),
        preserve_us: sp(|r| r.preserve_us),
        retrieve_us: sp(|r| r.retrieve_us),
        handover_bytes: sp(|r| r.handover_bytes),
        phases_median_us: Value::Object(phases),
        runs,
    }
}

/// A guest size for people: whole TiB, else GiB, else MiB (rounded down).
pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 40 && b % (1 << 40) == 0 => format!("{} TiB", b >> 40),
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b => format!("{} MiB", b >> 20),
    }
}

/// The plot's series: one line per (kind, fill), in legend order, with its color and label.
const SERIES: &[(Kind, Fill, &str, &str)] = &[
    (
        Kind::LiveV2,
        Fill::Written,
        "#1f77b4",
        "live update, v2 (written)",
    ),
    (
        Kind::LiveV2,
        Fill::Fragmented,
        "#17becf",
        "live update, v2 (fragmented)",
    ),
    (
        Kind::LiveV2,
        Fill::Sparse,
        "#7f7f7f",
        "live update, v2 (sparse, bound whole)",
    ),
    (
        Kind::LiveV2,
        Fill::Allocated,
        "#aec7e8",
        "live update, v2 (allocated)",
    ),
    (
        Kind::LiveV1,
        Fill::Written,
        "#2ca02c",
        "live update, RFC v1 (written)",
    ),
    (
        Kind::LiveHuge2M,
        Fill::Allocated,
        "#9467bd",
        "live update, v3 2 MiB folios",
    ),
    (
        Kind::LiveHuge1G,
        Fill::Allocated,
        "#8c564b",
        "live update, v3 1 GiB folios",
    ),
    (
        Kind::LiveSnapshot,
        Fill::Written,
        "#ff7f0e",
        "live snapshot, lazy restore",
    ),
    (
        Kind::Snapshot,
        Fill::Written,
        "#d62728",
        "eager snapshot/restore",
    ),
];

/// An SVG plot of blackout against guest size (log-log): one line per series through the
/// p50s, a bar from min to max and a tick at p99.
pub fn svg(points: &[Point]) -> String {
    let (w, h, l, r, t, b) = (1000.0, 560.0, 100.0, 300.0, 40.0, 60.0);
    let ok: Vec<&Point> = points
        .iter()
        .filter(|p| p.blackout_us.median > 0.0)
        .collect();
    let xs: Vec<f64> = ok.iter().map(|p| (p.guest_bytes as f64).log2()).collect();
    let ys: Vec<f64> = ok
        .iter()
        .flat_map(|p| [p.blackout_us.min.max(1.0), p.blackout_us.max.max(1.0)])
        .map(|v| (v / 1000.0).log10())
        .collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min).floor(),
        xs.iter().cloned().fold(f64::MIN, f64::max).ceil(),
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::MAX, f64::min).floor(),
        ys.iter().cloned().fold(f64::MIN, f64::max).ceil(),
    );
    let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 + 1.0));
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let ms = |us: f64| (us.max(1.0) / 1000.0).log10();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">Guest-visible blackout vs guest memory (line: p50; bar: min..max; tick: p99)</text>\n",
        (w - r + l) / 2.0
    );
    let mut y = y0;
    while y <= y1 + 1e-9 {
        let v = 10f64.powf(y);
        s += &format!("<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{4} ms</text>\n", py(y), w - r, l - 6.0, py(y) + 4.0, if v >= 1.0 { format!("{v:.0}") } else { format!("{v}") });
        y += 1.0;
    }
    let mut x = x0;
    while x <= x1 + 1e-9 {
        if (x as i64) % 2 == 0 {
            s += &format!("<line x1=\"{0}\" y1=\"{t}\" x2=\"{0}\" y2=\"{1}\" stroke=\"#eee\"/><text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>\n", px(x), h - b, h - b + 18.0, human(2f64.powf(x) as u64));
        }
        x += 1.0;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">guest memory (guest_memfd size)</text>\n",
        (w - r + l) / 2.0,
        h - 14.0
    );
    let mut row = 0;
    for &(kind, fill, color, label) in SERIES {
        let mine: Vec<&&Point> = ok
            .iter()
            .filter(|p| p.kind == kind && p.fill == fill && p.slot_bytes == p.guest_bytes)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let pts: Vec<String> = mine
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    px((p.guest_bytes as f64).log2()),
                    py(ms(p.blackout_us.median))
                )
            })
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for p in &mine {
            let xx = px((p.guest_bytes as f64).log2());
            let (lo, hi) = (py(ms(p.blackout_us.min)), py(ms(p.blackout_us.max)));
            let (mid, p99) = (py(ms(p.blackout_us.median)), py(ms(p.blackout_us.p99)));
            s += &format!(
                "<line x1=\"{xx}\" y1=\"{lo}\" x2=\"{xx}\" y2=\"{hi}\" stroke=\"{color}\"/>"
            );
            s += &format!("<circle cx=\"{xx}\" cy=\"{mid}\" r=\"3.5\" fill=\"{color}\"/>");
            s += &format!(
                "<line x1=\"{}\" y1=\"{p99}\" x2=\"{}\" y2=\"{p99}\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
                xx - 5.0,
                xx + 5.0
            );
        }
        let ly = t + 20.0 + 22.0 * row as f64;
        row += 1;
        s += &format!("<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{label}</text>\n", w - r + 10.0, w - r + 34.0, w - r + 40.0, ly + 4.0);
    }
    s += "</svg>\n";
    s
}
