//! A stop signal the detection threads wait on instead of waking on a short
//! timer to look at a flag: a flag plus an eventfd that becomes readable when
//! it is set, so a thread blocked in `poll` on its log source wakes at once.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// See the module documentation.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    fd: EventFd,
}

fn timeout(d: Duration) -> PollTimeout {
    PollTimeout::from(u16::try_from(d.as_millis()).unwrap_or(u16::MAX))
}

impl Stop {
    pub fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            fd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(std::io::Error::from)?,
        })
    }

    /// Sets the flag and wakes every waiter (the eventfd stays readable).
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.fd.write(1);
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits until `fd` is readable (true), or the stop is set or `wait`
    /// passes (false).
    pub fn wait_readable(&self, fd: BorrowedFd<'_>, wait: Duration) -> bool {
        if self.is_set() {
            return false;
        }
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout(wait)) {
            Ok(n) if n > 0 => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)),
            _ => false,
        }
    }

    /// Sleeps for `d`, or less when the stop is set meanwhile.
    pub fn sleep(&self, d: Duration) {
        if self.is_set() {
            return;
        }
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, timeout(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_sleeper_wakes_when_the_stop_is_set() {
        let stop = Arc::new(Stop::new().expect("eventfd"));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            s.sleep(Duration::from_secs(60));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        stop.set();
        let slept = t.join().expect("thread");
        assert!(slept < Duration::from_secs(60), "woke early, not at the timeout");
        assert!(stop.is_set());
        // Once set, waits return at once.
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert!(!stop.wait_readable(r.as_fd(), Duration::from_secs(60)));
    }
}
