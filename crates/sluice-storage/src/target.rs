//! [`StorageTarget`]: which storage an export's files are in, as saved with its job (D35).
//!
//! The JSON form is the one job records have always held: `null` for the server's default
//! storage, otherwise an object tagged by `provider`, e.g.
//! `{"provider":"aws","bucket":"b","account":"acc","endpoint":null}`.

use serde::{Deserialize, Serialize};

/// Which storage an export writes to: chosen at kick-off, saved with the job, and used to
/// sign the links of its files later. It names buckets and configuration resources, never
/// secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Option<Tagged>", into = "Option<Tagged>")]
pub enum StorageTarget {
    /// The server's default storage (local disk, or whatever a fixed source holds).
    /// Saved as `null`.
    #[default]
    Default,
    /// Amazon S3 (or an S3-compatible store), `"provider": "aws"`.
    Aws(AwsTarget),
    /// Azure Blob Storage, `"provider": "azure"`.
    Azure(AzureTarget),
    /// Google Cloud Storage, `"provider": "gcp"`.
    Gcp(GcpTarget),
}

impl StorageTarget {
    /// Whether this is [`StorageTarget::Default`] (saved as `null`, or left out).
    pub fn is_default(&self) -> bool {
        matches!(self, StorageTarget::Default)
    }

    /// The provider's name as saved (`aws`, `azure`, `gcp`); `None` for the default.
    pub fn provider(&self) -> Option<&'static str> {
        match self {
            StorageTarget::Default => None,
            StorageTarget::Aws(_) => Some("aws"),
            StorageTarget::Azure(_) => Some("azure"),
            StorageTarget::Gcp(_) => Some("gcp"),
        }
    }
}

/// An S3 bucket and the `AwsAccount` that opens it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AwsTarget {
    /// The bucket.
    pub bucket: String,
    /// Id of the `AwsAccount` configuration resource (region, keys).
    pub account: String,
    /// A custom endpoint (S3-compatible stores, emulators); `None`: AWS, or the account's `host`.
    pub endpoint: Option<String>,
}

/// An Azure container, as the `AzureContainer` resource named it at kick-off.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AzureTarget {
    /// The storage account name.
    pub storage: String,
    /// The container.
    pub container: String,
    /// Id of the `AzureAccount` resource holding the account key; `None`: keyless (Entra ID).
    pub account: Option<String>,
    /// A custom blob endpoint (emulators).
    pub endpoint: Option<String>,
}

/// A Google Cloud Storage bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GcpTarget {
    /// The bucket (without `gs://`).
    pub bucket: String,
    /// Id of the `GcpServiceAccount` resource; `None`: application default credentials.
    #[serde(rename = "service-account")]
    pub service_account: Option<String>,
    /// A custom endpoint (emulators).
    pub endpoint: Option<String>,
}

/// The non-null JSON forms, tagged by `provider`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
enum Tagged {
    Aws(AwsTarget),
    Azure(AzureTarget),
    Gcp(GcpTarget),
    /// Read only: an explicit local target means the default, as it always has.
    #[serde(skip_serializing)]
    Local,
}

impl From<Option<Tagged>> for StorageTarget {
    fn from(tagged: Option<Tagged>) -> Self {
        match tagged {
            None | Some(Tagged::Local) => StorageTarget::Default,
            Some(Tagged::Aws(t)) => StorageTarget::Aws(t),
            Some(Tagged::Azure(t)) => StorageTarget::Azure(t),
            Some(Tagged::Gcp(t)) => StorageTarget::Gcp(t),
        }
    }
}

impl From<StorageTarget> for Option<Tagged> {
    fn from(target: StorageTarget) -> Self {
        match target {
            StorageTarget::Default => None,
            StorageTarget::Aws(t) => Some(Tagged::Aws(t)),
            StorageTarget::Azure(t) => Some(Tagged::Azure(t)),
            StorageTarget::Gcp(t) => Some(Tagged::Gcp(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws() -> StorageTarget {
        StorageTarget::Aws(AwsTarget { bucket: "b".into(), account: "acc".into(), endpoint: None })
    }

    fn azure() -> StorageTarget {
        StorageTarget::Azure(AzureTarget {
            storage: "st".into(),
            container: "c".into(),
            account: Some("key1".into()),
            endpoint: Some("http://127.0.0.1:10000/st".into()),
        })
    }

    fn gcp() -> StorageTarget {
        StorageTarget::Gcp(GcpTarget { bucket: "g".into(), service_account: None, endpoint: None })
    }

    /// The exact text job records hold for each target (what the JSON built by hand, with
    /// its keys in this order, used to be).
    const SAVED: [&str; 4] = [
        "null",
        r#"{"provider":"aws","bucket":"b","account":"acc","endpoint":null}"#,
        r#"{"provider":"azure","storage":"st","container":"c","account":"key1","endpoint":"http://127.0.0.1:10000/st"}"#,
        r#"{"provider":"gcp","bucket":"g","service-account":null,"endpoint":null}"#,
    ];

    #[test]
    fn saved_json_is_unchanged_and_reads_back() {
        for (target, text) in [StorageTarget::Default, aws(), azure(), gcp()].into_iter().zip(SAVED) {
            assert_eq!(serde_json::to_string(&target).unwrap(), text);
            assert_eq!(serde_json::from_str::<StorageTarget>(text).unwrap(), target, "{text}");
        }
    }

    #[test]
    fn older_forms_still_read() {
        let read = |text: &str| serde_json::from_str::<StorageTarget>(text).unwrap();
        assert_eq!(read(r#"{"provider":"local"}"#), StorageTarget::Default);
        // Optional fields may be absent rather than null.
        assert_eq!(read(r#"{"provider":"aws","bucket":"b","account":"acc"}"#), aws());
        let keyless = read(r#"{"provider":"azure","storage":"st","container":"c"}"#);
        assert!(matches!(keyless, StorageTarget::Azure(AzureTarget { account: None, endpoint: None, .. })));
    }

    #[test]
    fn unknown_providers_and_missing_names_are_refused() {
        for text in [r#"{"provider":"ftp"}"#, r#"{"provider":"aws","account":"acc"}"#, r#"{"bucket":"b"}"#] {
            assert!(serde_json::from_str::<StorageTarget>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn provider_names() {
        assert_eq!(StorageTarget::Default.provider(), None);
        assert!(StorageTarget::Default.is_default() && !aws().is_default());
        assert_eq!([aws(), azure(), gcp()].map(|t| t.provider().unwrap()), ["aws", "azure", "gcp"]);
    }
}
