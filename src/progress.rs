//! Progress reporting without printing: the library asks a [`Progress`] for bars; the binary
//! supplies one that draws on stderr, tests and library users get hidden bars by default.

use indicatif::ProgressBar;

/// A source of progress bars.
pub trait Progress: Send + Sync {
    /// A bar for a phase of `total` units labelled `label`.
    fn bar(&self, label: &str, total: u64) -> ProgressBar;
}

/// Draws nothing.
pub struct Hidden;

impl Progress for Hidden {
    fn bar(&self, _label: &str, total: u64) -> ProgressBar {
        let b = ProgressBar::hidden();
        b.set_length(total);
        b
    }
}
