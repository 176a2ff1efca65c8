//! [`JobRepo`] on the store's own database: the unique `active` column enforces the
//! one-active-export rule.

use crate::SqliteStore;
use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use time::OffsetDateTime;

fn err(e: impl std::fmt::Display) -> JobError {
    JobError::Store(e.to_string())
}

fn now_ms() -> i64 {
    sluice_fhir::instant::to_millis(OffsetDateTime::now_utc())
}

fn active_flag(status: JobStatus) -> Option<i64> {
    status.is_active().then_some(1)
}

fn decode(json: &str) -> Result<JobRecord, JobError> {
    serde_json::from_str(json).map_err(|e| err(format!("unreadable job record: {e}")))
}

impl SqliteStore {
    async fn jobs_call<T, F>(&self, f: F) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, JobError> + Send + 'static,
    {
        self.with_writer(move |w| Ok(f(&w.conn))).await.map_err(err)?
    }
}

#[async_trait]
impl JobRepo for SqliteStore {
    async fn insert(&self, job: &JobRecord) -> Result<(), JobError> {
        let record = serde_json::to_string(job).map_err(err)?;
        let (id, status) = (job.id.clone(), job.status);
        self.jobs_call(move |c| {
            let now = now_ms();
            let res = c.execute(
                "INSERT INTO jobs(id, status, active, record, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, status.as_str(), active_flag(status), record, now],
            );
            match res {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    let running: Option<String> = c
                        .query_row("SELECT id FROM jobs WHERE active = 1", [], |r| r.get(0))
                        .optional()
                        .map_err(err)?;
                    Err(JobError::Busy(running.unwrap_or_default()))
                }
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        let id = id.to_string();
        self.jobs_call(move |c| {
            let rec: Option<String> = c
                .query_row("SELECT record FROM jobs WHERE id = ?1", params![id], |r| r.get(0))
                .optional()
                .map_err(err)?;
            rec.as_deref().map(decode).transpose()
        })
        .await
    }

    async fn save_if(&self, job: &JobRecord, expected: &[JobStatus]) -> Result<bool, JobError> {
        sluice_jobs::check_transition(expected, job.status)?;
        let record = serde_json::to_string(job).map_err(err)?;
        let (id, status) = (job.id.clone(), job.status);
        let expected: Vec<&'static str> = expected.iter().map(|s| s.as_str()).collect();
        self.jobs_call(move |c| {
            let list = expected.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(",");
            let now = now_ms();
            let n = c
                .execute(
                    &format!(
                        "UPDATE jobs SET status = ?2, active = ?3, record = ?4, updated_at = ?5 WHERE id = ?1 AND status IN ({list})"
                    ),
                    params![id, status.as_str(), active_flag(status), record, now],
                )
                .map_err(err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn recent(&self, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.jobs_call(move |c| {
            // Rows are inserted once, at kick-off: rowid is kick-off order.
            let mut stmt = c.prepare("SELECT record FROM jobs ORDER BY rowid DESC LIMIT ?1").map_err(err)?;
            let rows = stmt.query_map([limit], |r| r.get::<_, String>(0)).map_err(err)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(decode(&r.map_err(err)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn expired(&self, age: std::time::Duration, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        let before = now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.jobs_call(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT record FROM jobs WHERE status IN ('completed','failed') AND updated_at < ?1 \
                     ORDER BY updated_at LIMIT ?2",
                )
                .map_err(err)?;
            let rows = stmt.query_map(params![before, limit], |r| r.get::<_, String>(0)).map_err(err)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(decode(&r.map_err(err)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<JobRecord>, JobError> {
        self.jobs_call(|c| {
            let mut stmt = c
                .prepare("SELECT record FROM jobs WHERE status IN ('accepted','in-progress') ORDER BY updated_at")
                .map_err(err)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(err)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(decode(&r.map_err(err)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn touch(&self, id: &str) -> Result<bool, JobError> {
        let id = id.to_string();
        self.jobs_call(move |c| {
            let n = c
                .execute("UPDATE jobs SET updated_at = ?2 WHERE id = ?1 AND active = 1", params![id, now_ms()])
                .map_err(err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn release_lease(&self, id: &str) -> Result<bool, JobError> {
        let id = id.to_string();
        self.jobs_call(move |c| {
            let n =
                c.execute("UPDATE jobs SET updated_at = 0 WHERE id = ?1 AND active = 1", params![id]).map_err(err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn claim_stale(&self, lease: std::time::Duration) -> Result<Vec<JobRecord>, JobError> {
        self.jobs_call(move |c| {
            let now = now_ms();
            let mut stmt = c
                .prepare("UPDATE jobs SET updated_at = ?1 WHERE active = 1 AND updated_at <= ?2 RETURNING record")
                .map_err(err)?;
            let rows =
                stmt.query_map(params![now, now - lease.as_millis() as i64], |r| r.get::<_, String>(0)).map_err(err)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(decode(&r.map_err(err)?)?);
            }
            Ok(out)
        })
        .await
    }
}
