//! An in-memory [`Storage`] for testing the layers above storage.

use crate::{ObjectMeta, ObjectWriter, SignedUrl, Storage, StorageError, validate_key};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// A finished object held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryObject {
    /// The object's bytes.
    pub bytes: Vec<u8>,
    /// Its metadata.
    pub meta: ObjectMeta,
}

/// Objects kept in a map; signed URLs are `memory://<key>?expires=<unix>`.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    objects: Arc<Mutex<BTreeMap<String, MemoryObject>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A finished object, if present.
    pub fn get(&self, key: &str) -> Option<MemoryObject> {
        self.objects.lock().expect("memory storage lock").get(key).cloned()
    }

    /// All finished keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().expect("memory storage lock").keys().cloned().collect()
    }
}

struct MemoryWriter {
    key: String,
    meta: ObjectMeta,
    buf: Vec<u8>,
    objects: Arc<Mutex<BTreeMap<String, MemoryObject>>>,
}

#[async_trait]
impl ObjectWriter for MemoryWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<u64, StorageError> {
        let n = self.buf.len() as u64;
        let obj = MemoryObject { bytes: self.buf, meta: self.meta };
        self.objects.lock().expect("memory storage lock").insert(self.key, obj);
        Ok(n)
    }

    async fn abort(self: Box<Self>) {}
}

#[async_trait]
impl Storage for MemoryStorage {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    fn provider(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, key: &str, meta: ObjectMeta) -> Result<Box<dyn ObjectWriter>, StorageError> {
        validate_key(key)?;
        Ok(Box::new(MemoryWriter { key: key.to_string(), meta, buf: Vec::new(), objects: self.objects.clone() }))
    }

    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        validate_key(key)?;
        if self.get(key).is_none() {
            return Err(StorageError::NotFound(key.to_string()));
        }
        let expires = OffsetDateTime::now_utc() + ttl;
        Ok(SignedUrl { url: format!("memory://{key}?expires={}", expires.unix_timestamp()), expires })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let mut map = self.objects.lock().expect("memory storage lock");
        let before = map.len();
        map.retain(|k, _| !k.starts_with(prefix));
        Ok((before - map.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Subject;

    fn subject() -> Subject {
        let storage = MemoryStorage::new();
        Subject::new(Arc::new(storage.clone()), Arc::new(storage), 64 << 10)
    }

    crate::storage_conformance_tests!(Some(subject()));

    #[tokio::test]
    async fn links_name_the_key_and_expiry_and_need_an_object() {
        let s = MemoryStorage::new();
        s.create("x/a.ndjson", ObjectMeta::ndjson(false)).await.unwrap().finish().await.unwrap();
        let url = s.signed_url("x/a.ndjson", Duration::from_secs(60)).await.unwrap();
        assert_eq!(url.url, format!("memory://x/a.ndjson?expires={}", url.expires.unix_timestamp()));
        let missing = s.signed_url("x/b.ndjson", Duration::from_secs(60)).await;
        assert!(matches!(missing, Err(StorageError::NotFound(_))), "{missing:?}");
        assert_eq!(s.keys(), ["x/a.ndjson"]);
    }
}
