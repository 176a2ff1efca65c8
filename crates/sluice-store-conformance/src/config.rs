//! Configuration resources: JSON documents by type and id, apart from FHIR data.

use crate::Store;
use sluice_store::{ReadResult, ScanFilter};
use std::sync::Arc;

/// `config_put` creates or replaces a document (saying which), `config_get` returns its
/// text exactly, `config_delete` removes it (saying whether it existed); the type is part of
/// the key, and no export reads them.
pub async fn config_resources<S: Store>(store: S) {
    let s = Arc::new(store);
    assert_eq!(s.config_get("AwsAccount", "a").await.unwrap(), None);
    assert!(!s.config_delete("AwsAccount", "a").await.unwrap(), "nothing to delete");
    let v1 = r#"{"resourceType": "AwsAccount", "id": "a", "region": "eu-west-1"}"#;
    assert!(s.config_put("AwsAccount", "a", v1).await.unwrap(), "created");
    assert_eq!(s.config_get("AwsAccount", "a").await.unwrap().as_deref(), Some(v1), "the text as it was put");
    let v2 = r#"{"resourceType":"AwsAccount","id":"a","region":"us-east-2"}"#;
    assert!(!s.config_put("AwsAccount", "a", v2).await.unwrap(), "replaced");
    assert_eq!(s.config_get("AwsAccount", "a").await.unwrap().as_deref(), Some(v2));
    let other = r#"{"resourceType":"AzureContainer","id":"a"}"#;
    assert!(s.config_put("AzureContainer", "a", other).await.unwrap(), "the type is part of the key");
    assert_eq!(s.config_get("AwsAccount", "a").await.unwrap().as_deref(), Some(v2));
    assert_eq!(s.config_get("AwsAccount", "b").await.unwrap(), None);

    // Apart from FHIR data: no read, count or scan sees them.
    assert_eq!(s.read("AwsAccount", "a").await.unwrap(), ReadResult::NotFound);
    let snap = s.snapshot().await.unwrap();
    assert!(s.count(&snap, &ScanFilter::default()).await.unwrap().is_empty(), "no export counts them");
    s.release(&snap).await;

    assert!(s.config_delete("AwsAccount", "a").await.unwrap());
    assert_eq!(s.config_get("AwsAccount", "a").await.unwrap(), None);
    assert!(!s.config_delete("AwsAccount", "a").await.unwrap(), "deleted once");
    assert_eq!(s.config_get("AzureContainer", "a").await.unwrap().as_deref(), Some(other), "left alone");
}
