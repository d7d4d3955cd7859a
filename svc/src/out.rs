//! Standard output for the CLIs. `println!` panics when stdout cannot be written, which is
//! what happens when its reader has gone (`tessera-server entry show | head -1`). [`write`]
//! returns an error instead: [`StdoutError::Closed`] for a reader that has gone, which
//! [`crate::run_main`] turns into a quiet exit with status 0 (the output nobody reads is the
//! only thing lost), and [`StdoutError::Io`] for anything else.

use std::io::Write;

/// Why standard output could not take the text.
#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// The reader of the pipe or socket has gone (`EPIPE`).
    #[error("standard output was closed by its reader")]
    Closed,
    /// Any other write error (a full disk behind a redirect, ...).
    #[error("cannot write to standard output: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for StdoutError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe { Self::Closed } else { Self::Io(e) }
    }
}

/// Writes `text` to standard output as it is (no newline added) and flushes it.
pub fn write(text: &str) -> Result<(), StdoutError> {
    write_parts(&[text.as_bytes()])
}

/// Writes `text` and a newline to standard output.
pub fn line(text: &str) -> Result<(), StdoutError> {
    write_parts(&[text.as_bytes(), b"\n"])
}

fn write_parts(parts: &[&[u8]]) -> Result<(), StdoutError> {
    let mut o = std::io::stdout().lock();
    for p in parts {
        o.write_all(p)?;
    }
    o.flush()?;
    Ok(())
}

/// True when `e` (or an error in its chain) says standard output was closed by its reader.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<StdoutError>(), Some(StdoutError::Closed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_pipe_counts_as_a_closed_reader() {
        let closed = StdoutError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(matches!(closed, StdoutError::Closed));
        let full = StdoutError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(full, StdoutError::Io(_)));
        assert!(is_closed(&anyhow::Error::from(StdoutError::Closed).context("printing the entries")));
        assert!(!is_closed(&anyhow::Error::from(full)));
        // A broken pipe on a socket the CLI talks to is a real error, not a closed stdout.
        assert!(!is_closed(&anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))));
    }
}
