//! libsystemd's journal reader (sd-journal), loaded at run time.
//!
//! Reading the journal in-process instead of through a `journalctl` child
//! saves that process (about 7 MiB resident) and a JSON round trip per
//! entry, and it is the reader journalctl itself uses, so every journal
//! format, compression and file layout systemd supports works, and cursors
//! are the same strings journalctl prints (a cursor stored by an agent that
//! still followed journalctl resumes here). The library is opened with
//! `dlopen` rather than linked, so the agent starts on a node without it
//! (journald monitors then fail with an error saying what to install) and
//! building it needs no libsystemd headers.
//!
//! sd-journal objects are not thread-safe: one [`Journal`] is opened, used
//! and closed by one thread (the reader thread of its log source).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

#[repr(C)]
struct SdJournal {
    _private: [u8; 0],
}

/// `SD_JOURNAL_LOCAL_ONLY`: this machine's journals, as journalctl reads them.
const LOCAL_ONLY: c_int = 1;

/// The library's entry points this reader uses.
struct Lib {
    open: unsafe extern "C" fn(*mut *mut SdJournal, c_int) -> c_int,
    open_directory: unsafe extern "C" fn(*mut *mut SdJournal, *const c_char, c_int) -> c_int,
    close: unsafe extern "C" fn(*mut SdJournal),
    add_match: unsafe extern "C" fn(*mut SdJournal, *const c_void, usize) -> c_int,
    add_disjunction: unsafe extern "C" fn(*mut SdJournal) -> c_int,
    seek_cursor: unsafe extern "C" fn(*mut SdJournal, *const c_char) -> c_int,
    test_cursor: unsafe extern "C" fn(*mut SdJournal, *const c_char) -> c_int,
    seek_realtime_usec: unsafe extern "C" fn(*mut SdJournal, u64) -> c_int,
    next: unsafe extern "C" fn(*mut SdJournal) -> c_int,
    get_realtime_usec: unsafe extern "C" fn(*mut SdJournal, *mut u64) -> c_int,
    get_cursor: unsafe extern "C" fn(*mut SdJournal, *mut *mut c_char) -> c_int,
    restart_data: unsafe extern "C" fn(*mut SdJournal),
    enumerate_data: unsafe extern "C" fn(*mut SdJournal, *mut *const c_void, *mut usize) -> c_int,
    get_fd: unsafe extern "C" fn(*mut SdJournal) -> c_int,
    get_timeout: unsafe extern "C" fn(*mut SdJournal, *mut u64) -> c_int,
    process: unsafe extern "C" fn(*mut SdJournal) -> c_int,
    /// Keeps the library mapped for as long as the pointers above are used.
    _lib: libloading::Library,
}

impl Lib {
    fn load() -> Result<Lib, String> {
        // SAFETY: libsystemd's initialisers have no preconditions; the
        // symbols are looked up with the signatures sd-journal(3) documents.
        unsafe {
            let lib = libloading::Library::new("libsystemd.so.0").map_err(|e| {
                format!("cannot load libsystemd.so.0 ({e}): install libsystemd0 (Debian, Ubuntu) or systemd-libs (RHEL, Fedora)")
            })?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("libsystemd.so.0 has no {}: {e}", $name))?
                };
            }
            Ok(Lib {
                open: sym!("sd_journal_open"),
                open_directory: sym!("sd_journal_open_directory"),
                close: sym!("sd_journal_close"),
                add_match: sym!("sd_journal_add_match"),
                add_disjunction: sym!("sd_journal_add_disjunction"),
                seek_cursor: sym!("sd_journal_seek_cursor"),
                test_cursor: sym!("sd_journal_test_cursor"),
                seek_realtime_usec: sym!("sd_journal_seek_realtime_usec"),
                next: sym!("sd_journal_next"),
                get_realtime_usec: sym!("sd_journal_get_realtime_usec"),
                get_cursor: sym!("sd_journal_get_cursor"),
                restart_data: sym!("sd_journal_restart_data"),
                // systemd ≥ 246 skips fields it cannot read (damaged, or
                // compressed in a way this build does not support) instead of
                // failing the entry; older ones have only the strict call.
                enumerate_data: match lib.get(b"sd_journal_enumerate_available_data\0") {
                    Ok(f) => *f,
                    Err(_) => sym!("sd_journal_enumerate_data"),
                },
                get_fd: sym!("sd_journal_get_fd"),
                get_timeout: sym!("sd_journal_get_timeout"),
                process: sym!("sd_journal_process"),
                _lib: lib,
            })
        }
    }
}

fn lib() -> std::io::Result<&'static Lib> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load)
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))
}

/// A negative errno from sd-journal as an error naming the call.
fn check(r: c_int, what: &str) -> std::io::Result<c_int> {
    if r < 0 {
        let e = std::io::Error::from_raw_os_error(-r);
        Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

/// An open journal, positioned between entries.
pub struct Journal {
    lib: &'static Lib,
    j: *mut SdJournal,
}

// SAFETY: sd-journal asks that one thread at a time, and the same thread for
// the object's whole life, use it. A `Journal` is opened by the reader thread
// of its source (`LogSource::open`), which is the only thread that reads and
// drops it; it moves between threads only before it is opened (the source
// holds `None` then).
unsafe impl Send for Journal {}

impl Journal {
    /// Opens the local system journal (`None`) or the journal files of a
    /// directory.
    pub fn open(directory: Option<&Path>) -> std::io::Result<Journal> {
        let lib = lib()?;
        let mut j = std::ptr::null_mut();
        let r = match directory {
            None => unsafe { (lib.open)(&mut j, LOCAL_ONLY) },
            Some(d) => {
                let path = CString::new(d.as_os_str().as_encoded_bytes())
                    .map_err(|_| std::io::Error::other("journal directory has a NUL byte"))?;
                unsafe { (lib.open_directory)(&mut j, path.as_ptr(), 0) }
            }
        };
        check(r, "sd_journal_open")?;
        let journal = Journal { lib, j };
        // Set up the change notification before the first read, so that no
        // entry written in between is missed (sd_journal_get_fd(3)).
        journal.fd()?;
        Ok(journal)
    }

    /// Adds a match (`FIELD=value`): matches of one field are ORed, of
    /// different fields ANDed, as journalctl's arguments.
    pub fn add_match(&mut self, term: &str) -> std::io::Result<()> {
        check(
            unsafe { (self.lib.add_match)(self.j, term.as_ptr().cast(), term.len()) },
            "sd_journal_add_match",
        )
        .map(drop)
    }

    /// Starts another alternative of matches (journalctl's `+`).
    pub fn add_disjunction(&mut self) -> std::io::Result<()> {
        check(
            unsafe { (self.lib.add_disjunction)(self.j) },
            "sd_journal_add_disjunction",
        )
        .map(drop)
    }

    /// Seeks to the entry of `cursor` (or the nearest one when it is gone).
    pub fn seek_cursor(&mut self, cursor: &str) -> std::io::Result<()> {
        let c = CString::new(cursor).map_err(|_| std::io::Error::other("journal cursor has a NUL byte"))?;
        check(
            unsafe { (self.lib.seek_cursor)(self.j, c.as_ptr()) },
            "sd_journal_seek_cursor",
        )
        .map(drop)
    }

    /// Whether the current entry is the one of `cursor`.
    pub fn test_cursor(&mut self, cursor: &str) -> std::io::Result<bool> {
        let c = CString::new(cursor).map_err(|_| std::io::Error::other("journal cursor has a NUL byte"))?;
        check(
            unsafe { (self.lib.test_cursor)(self.j, c.as_ptr()) },
            "sd_journal_test_cursor",
        )
        .map(|r| r > 0)
    }

    /// Seeks to the first entry at or after `usec` (microseconds since the epoch).
    pub fn seek_realtime(&mut self, usec: u64) -> std::io::Result<()> {
        check(
            unsafe { (self.lib.seek_realtime_usec)(self.j, usec) },
            "sd_journal_seek_realtime_usec",
        )
        .map(drop)
    }

    /// Moves to the next entry (sd_journal_next); false at the end.
    pub fn step(&mut self) -> std::io::Result<bool> {
        check(unsafe { (self.lib.next)(self.j) }, "sd_journal_next").map(|r| r > 0)
    }

    /// The current entry's wall-clock time, in microseconds since the epoch.
    pub fn realtime(&mut self) -> std::io::Result<u64> {
        let mut t = 0;
        check(
            unsafe { (self.lib.get_realtime_usec)(self.j, &mut t) },
            "sd_journal_get_realtime_usec",
        )?;
        Ok(t)
    }

    /// The current entry's cursor.
    pub fn cursor(&mut self) -> std::io::Result<String> {
        let mut c: *mut c_char = std::ptr::null_mut();
        check(
            unsafe { (self.lib.get_cursor)(self.j, &mut c) },
            "sd_journal_get_cursor",
        )?;
        if c.is_null() {
            return Err(std::io::Error::other("sd_journal_get_cursor returned no cursor"));
        }
        // SAFETY: a NUL-terminated string malloc'd by libsystemd, ours to free.
        let s = unsafe { CStr::from_ptr(c) }.to_string_lossy().into_owned();
        unsafe { libc::free(c.cast()) };
        Ok(s)
    }

    /// Calls `f` with each `FIELD=value` of the current entry (a field
    /// repeated in the entry comes once per value). The slices are valid only
    /// during the call.
    pub fn for_each_field(&mut self, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        unsafe { (self.lib.restart_data)(self.j) };
        loop {
            let mut data: *const c_void = std::ptr::null();
            let mut len = 0usize;
            let r = check(
                unsafe { (self.lib.enumerate_data)(self.j, &mut data, &mut len) },
                "sd_journal_enumerate_data",
            )?;
            if r == 0 {
                return Ok(());
            }
            if !data.is_null() {
                // SAFETY: libsystemd hands out `len` readable bytes that stay
                // valid until the next call on this journal.
                f(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) });
            }
        }
    }

    /// The descriptor that turns readable when the journal changes.
    fn fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        let fd = check(unsafe { (self.lib.get_fd)(self.j) }, "sd_journal_get_fd")?;
        // SAFETY: the descriptor belongs to the journal and lives as long as it.
        Ok(unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// Waits until the journal may have changed, up to `wait` (less when the
    /// journal's own timeout says so, as on file systems without inotify),
    /// or until `stop` is set; then lets the journal take the change in
    /// (new entries, rotated or deleted files).
    pub fn wait(&mut self, wait: Duration, stop: &crate::detect::stop::Stop) -> std::io::Result<()> {
        let mut usec = u64::MAX;
        check(
            unsafe { (self.lib.get_timeout)(self.j, &mut usec) },
            "sd_journal_get_timeout",
        )?;
        let wait = if usec == u64::MAX {
            wait
        } else {
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .map(|t| Duration::from(t).as_micros() as u64)
                .unwrap_or(0);
            wait.min(Duration::from_micros(usec.saturating_sub(now)))
        };
        stop.wait_readable(self.fd()?, wait);
        check(unsafe { (self.lib.process)(self.j) }, "sd_journal_process").map(drop)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        unsafe { (self.lib.close)(self.j) };
    }
}
