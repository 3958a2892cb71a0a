//! A one-line progress display for the long steps (model load, evaluation, burst): a bar
//! redrawn on stderr when it is a terminal, and one result line on stdout when done.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Progress of `total` units of work; shared by the tasks doing them.
pub(crate) struct Progress {
    label: String,
    total: usize,
    done: AtomicUsize,
    started: Instant,
    live: bool,
}

impl Progress {
    pub(crate) fn new(label: String, total: usize) -> Self {
        let p = Self {
            label,
            total: total.max(1),
            done: AtomicUsize::new(0),
            started: Instant::now(),
            live: std::io::stderr().is_terminal(),
        };
        p.draw(0);
        p
    }

    fn draw(&self, done: usize) {
        if !self.live {
            return;
        }
        const WIDTH: usize = 24;
        let filled = (done * WIDTH / self.total).min(WIDTH);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r    {:<16} [{}{}] {done}/{} {:>6.1} s",
            self.label,
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }

    fn clear(&self) {
        if self.live {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{:<80}\r", "");
            let _ = err.flush();
        }
    }

    /// One unit done.
    pub(crate) fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        self.draw(done);
    }

    /// Clears the bar and prints the result line.
    pub(crate) fn finish(&self, detail: &str) {
        self.clear();
        super::say(&format!(
            "    {:<16} {}/{} in {:.1} s: {detail}",
            self.label,
            self.done.load(Ordering::Acquire),
            self.total,
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// Clears the bar and says why the work stopped.
    pub(crate) fn abandon(&self, why: &str) {
        self.clear();
        super::say(&format!(
            "    {:<16} stopped after {:.1} s: {why}",
            self.label,
            self.started.elapsed().as_secs_f64()
        ));
    }
}
