//! Export files on local disk, served by Sluice itself at HMAC-signed URLs.
//!
//! Objects live under a root folder (`<data-dir>/exports`). A file is written as
//! `<key>.partial` and renamed to `<key>` when finished, so a reader never sees a
//! half-written file. A signed URL is `<base>/files/<key>?expires=<unix>&sig=<hex>`, where
//! `sig` is HMAC-SHA256 over `<key>\n<expires>` with a key kept in the data dir
//! ([`SigningKey::load_or_create`]); [`LocalStorage::open_signed`] checks it before a file
//! is served.

use async_trait::async_trait;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sluice_storage::{ObjectMeta, ObjectWriter, SignedUrl, Storage, StorageError, owner_only, validate_key};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

/// The secret used to sign download URLs. Never logged (its `Debug` is redacted).
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key from configured bytes (e.g. an environment variable).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        SigningKey(bytes.into())
    }

    /// A key given in hex (`SLUICE_SIGNING_KEY`); `None` unless it is non-empty hex.
    pub fn from_hex(hex_key: &str) -> Option<Self> {
        hex::decode(hex_key.trim()).ok().filter(|k| !k.is_empty()).map(SigningKey)
    }

    /// Reads the hex key at `path`, or creates it (32 random bytes, mode 0600, in a folder
    /// created 0700) if absent. An existing key file that other users may read is made
    /// owner-only, with a warning (D50).
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                owner_only::tighten(path, "the URL signing key")?;
                let bytes = hex::decode(s.trim()).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: not a hex key: {e}", path.display()),
                    )
                })?;
                Ok(SigningKey(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    owner_only::create_dir_all(dir)?;
                }
                let tmp = path.with_extension("tmp");
                // A leftover from an interrupted start keeps its mode when opened again.
                let _ = std::fs::remove_file(&tmp);
                write_private(&tmp, hex::encode(&bytes).as_bytes())?;
                std::fs::rename(&tmp, path)?;
                Ok(SigningKey(bytes))
            }
            Err(e) => Err(e),
        }
    }

    /// A key for another purpose (`label`), derived from this one (HMAC-SHA256), so one
    /// configured secret serves several uses without a use learning another's key.
    pub fn derive(&self, label: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(b"sluice derived key\n");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The MAC over `<key>\n<expires>`.
    fn mac(&self, key: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    fn sign(&self, key: &str, expires: i64) -> String {
        hex::encode(self.mac(key, expires).finalize().into_bytes())
    }

    fn verify(&self, key: &str, expires: i64, sig: &str) -> bool {
        hex::decode(sig).is_ok_and(|sig| self.mac(key, expires).verify_slice(&sig).is_ok())
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Why a download was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DownloadError {
    /// The signature does not match the key and expiry.
    #[error("the download link's signature is not valid")]
    BadSignature,
    /// The link is past its expiry.
    #[error("the download link expired; poll the export status for fresh links")]
    Expired,
    /// The file does not exist (deleted, or never written).
    #[error("the file does not exist (the export may have been deleted)")]
    NotFound,
}

/// A file ready to be served.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file, positioned at its start.
    pub file: tokio::fs::File,
    /// Its length in bytes.
    pub len: u64,
    /// Its `Content-Type` / `Content-Encoding`.
    pub meta: ObjectMeta,
}

/// Export files on local disk.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    base_url: String,
    key: SigningKey,
}

impl LocalStorage {
    /// Files under `root`; URLs start with `base_url` (e.g. `http://host:8080`), path `/files/`.
    pub fn new(root: impl Into<PathBuf>, base_url: impl Into<String>, key: SigningKey) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_string();
        LocalStorage { root: root.into(), base_url, key }
    }

    /// The folder files are written under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata a file is served with, from its name (D10).
    pub fn meta_for(key: &str) -> ObjectMeta {
        if key.ends_with(".ndjson.gz") {
            ObjectMeta::ndjson(true)
        } else if key.ends_with(".ndjson") {
            ObjectMeta::ndjson(false)
        } else if key.ends_with(".json") {
            ObjectMeta { content_type: "application/json".into(), content_encoding: None }
        } else {
            ObjectMeta { content_type: "application/octet-stream".into(), content_encoding: None }
        }
    }

    /// Checks a signed link and opens the file it names.
    pub async fn open_signed(&self, key: &str, expires: i64, sig: &str) -> Result<OpenedFile, DownloadError> {
        if validate_key(key).is_err() || !self.key.verify(key, expires, sig) {
            return Err(DownloadError::BadSignature);
        }
        if OffsetDateTime::now_utc().unix_timestamp() > expires {
            return Err(DownloadError::Expired);
        }
        self.open_key(key).await
    }

    /// Opens the file at `key` without a signature: for a caller that has authorized the
    /// download itself (bearer-protected downloads, `requiresAccessToken: true`).
    pub async fn open(&self, key: &str) -> Result<OpenedFile, DownloadError> {
        if validate_key(key).is_err() {
            return Err(DownloadError::NotFound);
        }
        self.open_key(key).await
    }

    async fn open_key(&self, key: &str) -> Result<OpenedFile, DownloadError> {
        let path = self.root.join(key);
        let file = tokio::fs::File::open(&path).await.map_err(|_| DownloadError::NotFound)?;
        let len = file.metadata().await.map_err(|_| DownloadError::NotFound)?.len();
        Ok(OpenedFile { file, len, meta: Self::meta_for(key) })
    }

    /// The files under `dir`, in every subfolder.
    async fn count_files(&self, dir: &Path) -> std::io::Result<u64> {
        let (mut count, mut dirs) = (0, vec![dir.to_path_buf()]);
        while let Some(d) = dirs.pop() {
            let mut rd = tokio::fs::read_dir(&d).await?;
            while let Some(entry) = rd.next_entry().await? {
                let t = entry.file_type().await?;
                if t.is_dir() {
                    dirs.push(entry.path());
                } else if t.is_file() {
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    fn io(&self, path: &Path, source: std::io::Error) -> StorageError {
        // Paths relative to the root keep logs short and hide the local layout.
        let location = path.strip_prefix(&self.root).unwrap_or(path).display().to_string();
        StorageError::Io { location, source }
    }
}

struct LocalWriter {
    tmp: PathBuf,
    dest: PathBuf,
    file: tokio::fs::File,
    written: u64,
    storage: LocalStorage,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.file.write_all(&chunk).await.map_err(|e| self.storage.io(&self.tmp, e))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        self.file.flush().await.map_err(|e| self.storage.io(&self.tmp, e))?;
        self.file.sync_data().await.map_err(|e| self.storage.io(&self.tmp, e))?;
        tokio::fs::rename(&self.tmp, &self.dest).await.map_err(|e| self.storage.io(&self.dest, e))?;
        Ok(self.written)
    }

    async fn abort(self: Box<Self>) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn describe(&self) -> String {
        format!("local disk ({})", self.root.display())
    }

    fn provider(&self) -> &'static str {
        "local"
    }

    async fn create(&self, key: &str, _meta: ObjectMeta) -> Result<Box<dyn ObjectWriter>, StorageError> {
        validate_key(key)?;
        let dest = self.root.join(key);
        let tmp = self.root.join(format!("{key}.partial"));
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| self.io(dir, e))?;
        }
        let file = tokio::fs::File::create(&tmp).await.map_err(|e| self.io(&tmp, e))?;
        Ok(Box::new(LocalWriter { tmp, dest, file, written: 0, storage: self.clone() }))
    }

    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        validate_key(key)?;
        let expires = OffsetDateTime::now_utc() + ttl;
        let exp = expires.unix_timestamp();
        let sig = self.key.sign(key, exp);
        let url = format!("{}/files/{key}?expires={exp}&sig={sig}", self.base_url);
        // Report the expiry at whole seconds, as encoded in the URL.
        let expires = OffsetDateTime::from_unix_timestamp(exp).unwrap_or(expires);
        Ok(SignedUrl { url, expires })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let prefix = prefix.trim_end_matches('/');
        validate_key(prefix)?;
        let dir = self.root.join(prefix);
        let count = match self.count_files(&dir).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(&dir, e)),
        };
        tokio::fs::remove_dir_all(&dir).await.map_err(|e| self.io(&dir, e))?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_storage::conformance::{Fetch, Fetched, Subject};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    fn storage(dir: &Path) -> LocalStorage {
        LocalStorage::new(dir.join("exports"), "http://h:1/", SigningKey::from_bytes(b"k".to_vec()))
    }

    /// Serves links as Sluice's `/files/` route does, through [`LocalStorage::open_signed`].
    struct Files {
        storage: LocalStorage,
        _dir: tempfile::TempDir,
    }

    #[async_trait]
    impl Fetch for Files {
        async fn fetch(&self, url: &str) -> Fetched {
            let (path, query) = url.strip_prefix("http://h:1/files/").and_then(|u| u.split_once('?')).expect(url);
            let (expires, sig) = query.strip_prefix("expires=").and_then(|q| q.split_once("&sig=")).expect(url);
            let refused = |status| Fetched { status, content_type: None, content_encoding: None, body: Vec::new() };
            match self.storage.open_signed(path, expires.parse().expect(url), sig).await {
                Ok(mut f) => {
                    let mut body = Vec::new();
                    f.file.read_to_end(&mut body).await.unwrap();
                    assert_eq!(body.len() as u64, f.len);
                    let (content_type, content_encoding) = (Some(f.meta.content_type), f.meta.content_encoding);
                    Fetched { status: 200, content_type, content_encoding, body }
                }
                Err(DownloadError::NotFound) => refused(404),
                Err(DownloadError::BadSignature | DownloadError::Expired) => refused(403),
            }
        }
    }

    fn subject() -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let files = Files { storage: storage(dir.path()), _dir: dir };
        Subject::new(Arc::new(files.storage.clone()), Arc::new(files), 64 << 10)
    }

    sluice_storage::storage_conformance_tests!(Some(subject()));

    #[tokio::test]
    async fn files_are_renamed_into_place_and_links_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let s = storage(tmp.path());
        let mut w = s.create("e1/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
        w.write(Bytes::from_static(b"{\"a\":1}\n")).await.unwrap();
        assert!(tmp.path().join("exports/e1/Patient.ndjson.partial").exists(), "written beside the file");
        assert!(!tmp.path().join("exports/e1/Patient.ndjson").exists(), "hidden until finished");
        assert_eq!(w.finish().await.unwrap(), 8);
        assert!(tmp.path().join("exports/e1/Patient.ndjson").exists());
        assert!(!tmp.path().join("exports/e1/Patient.ndjson.partial").exists());

        let u = s.signed_url("e1/Patient.ndjson", Duration::from_secs(60)).await.unwrap();
        assert!(u.url.starts_with("http://h:1/files/e1/Patient.ndjson?expires="), "{}", u.url);
        let q: std::collections::HashMap<_, _> =
            u.url.split_once('?').unwrap().1.split('&').filter_map(|kv| kv.split_once('=')).collect();
        let exp: i64 = q["expires"].parse().unwrap();
        assert_eq!(exp, u.expires.unix_timestamp());
        assert_eq!(s.open_signed("e1/Patient.ndjson", exp, q["sig"]).await.unwrap().meta, ObjectMeta::ndjson(false));

        assert_eq!(
            s.open_signed("e1/Patient.ndjson", exp + 1, q["sig"]).await.unwrap_err(),
            DownloadError::BadSignature
        );
        assert_eq!(s.open_signed("e1/Other.ndjson", exp, q["sig"]).await.unwrap_err(), DownloadError::BadSignature);
        assert_eq!(s.open_signed("e1/Patient.ndjson", exp, "zz").await.unwrap_err(), DownloadError::BadSignature);
        assert_eq!(s.delete_prefix("e1/").await.unwrap(), 1);
        assert_eq!(s.open_signed("e1/Patient.ndjson", exp, q["sig"]).await.unwrap_err(), DownloadError::NotFound);
    }

    #[tokio::test]
    async fn expired_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = storage(tmp.path());
        let w = s.create("e/x.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
        w.finish().await.unwrap();
        let exp = OffsetDateTime::now_utc().unix_timestamp() - 10;
        let sig = s.key.sign("e/x.ndjson", exp);
        assert_eq!(s.open_signed("e/x.ndjson", exp, &sig).await.unwrap_err(), DownloadError::Expired);
    }

    #[tokio::test]
    async fn delete_prefix_counts_files_in_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        for key in ["f/a.ndjson", "f/sub/b.ndjson", "f/sub/deeper/c.ndjson", "g/d.ndjson"] {
            let mut w = s.create(key, ObjectMeta::ndjson(false)).await.unwrap();
            w.write(Bytes::from_static(b"{}\n")).await.unwrap();
            w.finish().await.unwrap();
        }
        assert_eq!(s.delete_prefix("f/").await.unwrap(), 3);
        assert!(!s.root().join("f").exists());
        assert!(s.root().join("g/d.ndjson").exists(), "another folder stays");
        assert_eq!(s.delete_prefix("f/").await.unwrap(), 0, "nothing left to delete");
    }

    #[test]
    fn configured_keys_are_hex() {
        assert_eq!(SigningKey::from_hex("00ff10").map(|k| k.0), Some(vec![0, 255, 16]));
        for bad in ["", "0", "zz", "0g"] {
            assert!(SigningKey::from_hex(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("signing.key");
        let a = SigningKey::load_or_create(&p).unwrap();
        let b = SigningKey::load_or_create(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 32);
        assert_eq!(format!("{a:?}"), "SigningKey(<redacted>)");
    }

    #[cfg(unix)]
    #[test]
    fn key_file_and_its_folder_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("data/signing.key");
        let a = SigningKey::load_or_create(&p).unwrap();
        assert_eq!((mode(p.parent().unwrap()), mode(&p)), (0o700, 0o600));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let b = SigningKey::load_or_create(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(mode(&p), 0o600, "a readable key file is tightened");
    }
}
