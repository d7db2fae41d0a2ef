//! The admin token: from the configuration, or from `<data_dir>/admin.token`, generated at
//! the first start.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use courier_storage::io::{Disk, FileDisk};

use super::Token;

/// The admin token's file in the data directory.
const FILE: &str = "admin.token";

/// The admin token: `configured` if set, else the one in `<data_dir>/admin.token`, which is
/// generated when there is none (mode 0600, written to a temporary file, synced, renamed
/// into place and the directory synced, so a crash leaves the old state or the whole file).
/// Runs after the log has locked the data directory.
pub fn load_admin_token(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<Token> {
    if let Some(text) = configured {
        return Ok(Token::from_configured(text.to_owned()));
    }
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_readable_by_others(&path);
            let text = text.trim();
            anyhow::ensure!(
                text.len() >= 24 && text.chars().all(|c| c.is_ascii_graphic()),
                "the admin token file {} does not hold a token (at least 24 visible characters); remove it to have a new one generated, or set auth.admin_token",
                path.display()
            );
            Ok(Token::from_configured(text.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = Token::generate();
            write_new(data_dir, &path, &token)?;
            tracing::info!(
                path = %path.display(),
                "generated the admin token (read it from that file; it is not logged)"
            );
            Ok(token)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the admin token file {}", path.display()))
        }
    }
}

/// Logs a warning when the token file can be read by others than its owner.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the admin token file can be read by other users: chmod 600 it"
            );
        }
    }
}

fn write_new(data_dir: &Path, path: &Path, token: &Token) -> anyhow::Result<()> {
    let temporary = data_dir.join(format!("{FILE}.tmp"));
    let disk = FileDisk;
    let written = (|| -> std::io::Result<()> {
        // Created anew (a leftover of a crash is removed, never reused, whatever its mode),
        // 0600 before a byte is in it: nobody else can have it open.
        match std::fs::remove_file(&temporary) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        let file = disk.open(&temporary, true)?;
        file.write_at(format!("{}\n", token.reveal()).as_bytes(), 0)?;
        file.sync_data()?;
        disk.rename(&temporary, path)?;
        disk.sync_dir(data_dir)
    })();
    written.with_context(|| format!("cannot write the admin token file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_admin_token(None, dir.path()).unwrap();
        let path = dir.path().join(FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_admin_token(None, dir.path()).unwrap(), first);
        assert!(!dir.path().join("admin.token.tmp").exists());
        let configured = "x".repeat(30);
        assert_eq!(
            load_admin_token(Some(&configured), dir.path())
                .unwrap()
                .reveal(),
            configured
        );
        std::fs::write(&path, "short\n").unwrap();
        let error = load_admin_token(None, dir.path()).unwrap_err().to_string();
        assert!(error.contains("does not hold a token"), "{error}");
    }
}
