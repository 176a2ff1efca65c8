//! [`JobRepo`] on the store's database: a unique partial index on `active` enforces one
//! active export across every server sharing the database.

use crate::PgStore;
use async_trait::async_trait;
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};

fn err(e: impl std::fmt::Display) -> JobError {
    JobError::Store(e.to_string())
}

fn pg(e: tokio_postgres::Error) -> JobError {
    err(crate::pg_err(e))
}

fn decode(json: &str) -> Result<JobRecord, JobError> {
    serde_json::from_str(json).map_err(|e| err(format!("unreadable job record: {e}")))
}

impl PgStore {
    async fn job_client(&self) -> Result<deadpool_postgres::Object, JobError> {
        self.client().await.map_err(err)
    }
}

#[async_trait]
impl JobRepo for PgStore {
    async fn insert(&self, job: &JobRecord) -> Result<(), JobError> {
        let record = serde_json::to_string(job).map_err(err)?;
        let client = self.job_client().await?;
        let res = client
            .execute(
                "INSERT INTO sluice_job (id, status, active, record) VALUES ($1, $2, $3, $4)",
                &[&job.id, &job.status.as_str(), &job.status.is_active(), &record],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                let running = client
                    .query_opt("SELECT id FROM sluice_job WHERE active", &[])
                    .await
                    .map_err(pg)?
                    .map(|r| r.get::<_, String>(0));
                Err(JobError::Busy(running.unwrap_or_default()))
            }
            Err(e) => Err(pg(e)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        let client = self.job_client().await?;
        let row = client.query_opt("SELECT record FROM sluice_job WHERE id = $1", &[&id]).await.map_err(pg)?;
        row.map(|r| decode(r.get(0))).transpose()
    }

    async fn save_if(&self, job: &JobRecord, expected: &[JobStatus]) -> Result<bool, JobError> {
        sluice_jobs::check_transition(expected, job.status)?;
        let record = serde_json::to_string(job).map_err(err)?;
        let expected: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
        let client = self.job_client().await?;
        let n = client
            .execute(
                "UPDATE sluice_job SET status = $2, active = $3, record = $4, updated_at = clock_timestamp() \
                 WHERE id = $1 AND status = ANY($5)",
                &[&job.id, &job.status.as_str(), &job.status.is_active(), &record, &expected],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    async fn recent(&self, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        let client = self.job_client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows =
            client.query("SELECT record FROM sluice_job ORDER BY seq DESC LIMIT $1", &[&limit]).await.map_err(pg)?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }

    async fn expired(&self, age: std::time::Duration, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        let client = self.job_client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT record FROM sluice_job WHERE status IN ('completed', 'failed') \
                 AND updated_at < clock_timestamp() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
                &[&age.as_secs_f64(), &limit],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }

    async fn unfinished(&self) -> Result<Vec<JobRecord>, JobError> {
        let client = self.job_client().await?;
        let rows = client
            .query("SELECT record FROM sluice_job WHERE status IN ('accepted', 'in-progress') ORDER BY updated_at", &[])
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }

    async fn touch(&self, id: &str) -> Result<bool, JobError> {
        let client = self.job_client().await?;
        let n = client
            .execute("UPDATE sluice_job SET updated_at = clock_timestamp() WHERE id = $1 AND active", &[&id])
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    async fn release_lease(&self, id: &str) -> Result<bool, JobError> {
        let client = self.job_client().await?;
        let n = client
            .execute("UPDATE sluice_job SET updated_at = 'epoch' WHERE id = $1 AND active", &[&id])
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    async fn claim_stale(&self, lease: std::time::Duration) -> Result<Vec<JobRecord>, JobError> {
        let client = self.job_client().await?;
        let secs = lease.as_secs_f64();
        let rows = client
            .query(
                "UPDATE sluice_job SET updated_at = clock_timestamp() \
                 WHERE active AND updated_at <= clock_timestamp() - make_interval(secs => $1) RETURNING record",
                &[&secs],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }
}
