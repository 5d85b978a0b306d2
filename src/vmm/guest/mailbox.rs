//! The mailbox protocol: modes, statuses, field offsets, and the encoding of [`GuestParams`]
//! (VMM → guest) and [`GuestReport`] (guest → VMM).

use super::error::GuestError;
use super::layout::{IDENTITY_MAP_SIZE, LOW_IMAGE_SIZE, MAILBOX_LEN};

/// Mode: write the pattern.
pub const MODE_WRITE: u64 = 1;
/// Mode: verify the pattern.
pub const MODE_VERIFY: u64 = 2;
/// Mode: write, report, loop on the clock until told to proceed, verify.
pub const MODE_RUN_UPDATE: u64 = 3;
/// Mode: as [`MODE_RUN_UPDATE`] without the write (the host wrote the pattern already), and
/// with two read passes before the status instead of one.
pub const MODE_RUN_UPDATE_PREFILLED: u64 = 5;
/// Mode: one vCPU of several (see `smp.rs`): fill its region, report, loop on a shared counter,
/// the clock and the TSC until told to proceed, verify.
pub const MODE_SMP: u64 = 6;

/// Status: nothing reported yet (the value [`write_params`] leaves in the mailbox).
pub const STATUS_NONE: u64 = 0;
/// Status: the pattern is written (final in WRITE mode; a phase in RUN_UPDATE mode).
pub const STATUS_WRITTEN: u64 = 1;
/// Status (final): every byte matched.
pub const STATUS_VERIFY_OK: u64 = 2;
/// Status (final): a byte did not match; see [`MB_FIRST_BAD`].
pub const STATUS_VERIFY_FAILED: u64 = 3;
/// Status (final): the mode in the mailbox was not understood.
pub const STATUS_BAD_MODE: u64 = 4;

/// Mailbox magic, written by the builder (the guest does not check it; it helps `inspect`).
pub const GUEST_MAGIC: u64 = u64::from_le_bytes(*b"HOVGUES1");
/// Value of [`MB_FIRST_BAD`] when no bad byte was found (or verification has not run).
pub const NO_BAD_OFFSET: u64 = u64::MAX;

/// Mailbox offset of [`GUEST_MAGIC`]. All mailbox fields are little-endian `u64`; the next three
/// are written by the VMM, the last four by the guest.
pub const MB_MAGIC: usize = 0x00;
/// Data region guest physical address.
pub const MB_DATA_GPA: usize = 0x08;
/// Data region length in bytes.
pub const MB_DATA_LEN: usize = 0x10;
/// One of the `MODE_*` values.
pub const MB_MODE: usize = 0x18;
/// Guest → VMM: last reported `STATUS_*`.
pub const MB_STATUS: usize = 0x20;
/// Guest → VMM: first bad data offset, or [`NO_BAD_OFFSET`].
pub const MB_FIRST_BAD: usize = 0x28;
/// Guest → VMM: largest gap between consecutive clock reads, in µs (RUN_UPDATE).
pub const MB_MAX_GAP_US: usize = 0x30;
/// Guest → VMM: clock-loop iterations so far (RUN_UPDATE).
pub const MB_LOOPS: usize = 0x38;

/// The guest's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// [`MODE_WRITE`]
    Write,
    /// [`MODE_VERIFY`]
    Verify,
    /// [`MODE_RUN_UPDATE`]
    RunUpdate,
    /// [`MODE_RUN_UPDATE_PREFILLED`]
    RunUpdatePrefilled,
    /// [`MODE_SMP`]
    Smp,
}

impl GuestMode {
    /// The mailbox value of this mode.
    pub const fn code(self) -> u64 {
        match self {
            GuestMode::Write => MODE_WRITE,
            GuestMode::Verify => MODE_VERIFY,
            GuestMode::RunUpdate => MODE_RUN_UPDATE,
            GuestMode::RunUpdatePrefilled => MODE_RUN_UPDATE_PREFILLED,
            GuestMode::Smp => MODE_SMP,
        }
    }

    /// The mode of a mailbox value.
    pub fn from_code(code: u64) -> Result<Self, GuestError> {
        match code {
            MODE_WRITE => Ok(GuestMode::Write),
            MODE_VERIFY => Ok(GuestMode::Verify),
            MODE_RUN_UPDATE => Ok(GuestMode::RunUpdate),
            MODE_RUN_UPDATE_PREFILLED => Ok(GuestMode::RunUpdatePrefilled),
            MODE_SMP => Ok(GuestMode::Smp),
            other => Err(GuestError::BadMode(other)),
        }
    }
}

/// What the VMM tells the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Guest physical address of the data region.
    pub data_gpa: u64,
    /// Length of the data region in bytes (any length, not only multiples of 8).
    pub data_len: u64,
    /// What to do.
    pub mode: GuestMode,
}

/// What the guest reported, decoded from a copy of the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GuestReport {
    /// Last `STATUS_*` stored by the guest.
    pub status: u64,
    /// First bad data offset, if verification failed.
    pub first_bad: Option<u64>,
    /// Largest gap between two consecutive clock reads, µs (RUN_UPDATE).
    pub max_gap_us: u64,
    /// Clock-loop iterations (RUN_UPDATE).
    pub loops: u64,
}

impl GuestReport {
    /// `true` for a status after which the guest only repeats its report.
    pub fn is_final(&self, mode: GuestMode) -> bool {
        is_final_status(mode, self.status)
    }
}

/// `true` if `status` ends the program in `mode` (only [`STATUS_WRITTEN`] in RUN_UPDATE mode is
/// not final).
pub fn is_final_status(mode: GuestMode, status: u64) -> bool {
    match status {
        STATUS_NONE => false,
        STATUS_WRITTEN => !matches!(
            mode,
            GuestMode::RunUpdate | GuestMode::RunUpdatePrefilled | GuestMode::Smp
        ),
        _ => true,
    }
}

/// A short name for a status value, for messages.
pub fn status_name(status: u64) -> &'static str {
    match status {
        STATUS_NONE => "none",
        STATUS_WRITTEN => "written",
        STATUS_VERIFY_OK => "verify-ok",
        STATUS_VERIFY_FAILED => "verify-failed",
        STATUS_BAD_MODE => "bad-mode",
        _ => "unknown",
    }
}

pub(super) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Check that the data region lies inside the identity map and does not overlap the image.
pub fn check_params(params: &GuestParams) -> Result<(), GuestError> {
    let min = LOW_IMAGE_SIZE as u64;
    let max = IDENTITY_MAP_SIZE;
    let end = params.data_gpa.checked_add(params.data_len);
    match end {
        Some(end) if params.data_gpa >= min && end <= max => Ok(()),
        _ => Err(GuestError::DataRange {
            gpa: params.data_gpa,
            len: params.data_len,
            min,
            max,
        }),
    }
}

/// Write `params` into a mailbox buffer (at least [`MAILBOX_LEN`] bytes; the caller copies it to
/// [`MAILBOX_GPA`](super::MAILBOX_GPA)) and reset the result fields.
pub fn write_params(mailbox: &mut [u8], params: &GuestParams) -> Result<(), GuestError> {
    if mailbox.len() < MAILBOX_LEN {
        return Err(GuestError::MailboxTooSmall {
            need: MAILBOX_LEN,
            got: mailbox.len(),
        });
    }
    check_params(params)?;
    put_u64(mailbox, MB_MAGIC, GUEST_MAGIC);
    put_u64(mailbox, MB_DATA_GPA, params.data_gpa);
    put_u64(mailbox, MB_DATA_LEN, params.data_len);
    put_u64(mailbox, MB_MODE, params.mode.code());
    put_u64(mailbox, MB_STATUS, STATUS_NONE);
    put_u64(mailbox, MB_FIRST_BAD, NO_BAD_OFFSET);
    put_u64(mailbox, MB_MAX_GAP_US, 0);
    put_u64(mailbox, MB_LOOPS, 0);
    Ok(())
}

/// Decode the guest's report from a copy of the mailbox (at least [`MAILBOX_LEN`] bytes).
pub fn read_report(mailbox: &[u8]) -> Result<GuestReport, GuestError> {
    if mailbox.len() < MAILBOX_LEN {
        return Err(GuestError::MailboxTooSmall {
            need: MAILBOX_LEN,
            got: mailbox.len(),
        });
    }
    let first_bad = get_u64(mailbox, MB_FIRST_BAD);
    Ok(GuestReport {
        status: get_u64(mailbox, MB_STATUS),
        first_bad: (first_bad != NO_BAD_OFFSET).then_some(first_bad),
        max_gap_us: get_u64(mailbox, MB_MAX_GAP_US),
        loops: get_u64(mailbox, MB_LOOPS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_mailbox_values_are_errors() {
        assert!(matches!(
            read_report(&[0u8; 8]),
            Err(GuestError::MailboxTooSmall { .. })
        ));
        assert!(matches!(
            GuestMode::from_code(9),
            Err(GuestError::BadMode(9))
        ));
        assert_eq!(
            GuestMode::from_code(MODE_VERIFY).unwrap(),
            GuestMode::Verify
        );
        assert!(!is_final_status(GuestMode::RunUpdate, STATUS_WRITTEN));
        assert!(is_final_status(GuestMode::Write, STATUS_WRITTEN));
    }
}
