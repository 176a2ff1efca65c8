//! Owner-only files and folders (D50): the data dir (0700), the embedded database and the
//! URL signing key (0600) hold secrets, so no other local user may read them. No-ops on
//! platforms without Unix permissions.

use std::io;
use std::path::Path;

/// Creates `dir` and its missing parents, owner-only (0700). Existing folders are left as
/// they are (see [`tighten`]).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Creates the empty file `path`, owner-only (0600), unless it exists.
pub fn create_file(path: &Path) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes an existing `path` owner-only (a folder 0700, a file 0600) if group or others
/// may access it, logging a warning that names it (`what` says what it is). Returns
/// whether it changed anything; an absent path is not an error.
pub fn tighten(path: &Path, what: &str) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 == 0 {
            return Ok(false);
        }
        let private = if meta.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
        tracing::warn!(
            path = %path.display(),
            was = %format!("{mode:04o}"),
            now = %format!("{private:04o}"),
            "{what} was accessible to other local users; made it owner-only"
        );
        Ok(true)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, what);
        Ok(false)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_owner_only_and_loose_ones_tightened() {
        let tmp = std::env::temp_dir().join(format!("sluice-owner-only-{}", std::process::id()));
        let dir = tmp.join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&tmp.join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("f");
        create_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::write(&file, b"kept").unwrap();
        create_file(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"kept", "an existing file is not truncated");
        assert!(!tighten(&file, "the file").unwrap());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(tighten(&file, "the file").unwrap());
        assert!(tighten(&dir, "the folder").unwrap());
        assert_eq!((mode(&file), mode(&dir)), (0o600, 0o700));
        assert!(!tighten(&dir.join("absent"), "nothing").unwrap());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
