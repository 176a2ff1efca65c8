//! Planning the parts of a run: what the export reads ([`Filters`]: the compartment
//! filter, the late joiners' of a group export, D7, the deletions', D12), how much of each
//! type (the counts that become the job's progress totals), and the parts that read it: one
//! per type, one per id range of a large type, patient blocks (`organizeOutputBy=Patient`),
//! and one part listing the deletions.

use crate::{Engine, EngineConfig, RunError};
use sluice_fhir::{Issue, IssueCode, group_members, is_patient_compartment_type, late_joiners};
use sluice_jobs::{JobRecord, TypeProgress};
use sluice_planner::{ExportPlan, Level, TypeSelection};
use sluice_store::{IdRange, Patients, ScanFilter, Snapshot};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// What one part reads, in order: (resource type, filter).
pub(crate) type Sources = Vec<(String, ScanFilter)>;

/// The progress entry of the deletions part (`_since` exports).
pub(crate) const DELETED: &str = "deleted";

/// The name of the files of patient blocks (`organizeOutputBy=Patient`): `patients.ndjson`,
/// `patients-2.ndjson`, ...
pub(crate) const BLOCK_FILES: &str = "patients";

/// A part before it runs ([`Engine::plan_parts`]).
pub(crate) struct PlannedPart {
    /// The type its files are named after (`Bundle` for deletions, [`BLOCK_FILES`] for
    /// patient blocks).
    pub(crate) resource_type: String,
    /// What it reads (see the runner's `Part::sources`).
    pub(crate) sources: Sources,
    /// `organizeOutputBy=Patient`: the patient blocks it writes (`sources` is then empty).
    pub(crate) blocks: Option<Arc<Blocks>>,
    /// Whether it lists deletions.
    pub(crate) deleted: bool,
    /// About how many resources it reads: larger parts start first.
    pub(crate) size: u64,
}

/// The patient blocks of one part (`organizeOutputBy=Patient`): for each patient, in
/// order, a `Parameters` header naming it, then its compartment's resources, type by type
/// (`Patient` first), each read from the store through the patient's own compartment
/// filter. A resource in the compartments of several exported patients is in each of
/// their blocks, as the IG defines a block.
pub(crate) struct Blocks {
    /// Whose blocks.
    pub(crate) patients: BlockPatients,
    /// The types of a block, in order: `Patient` first, then the others by name.
    pub(crate) types: Vec<String>,
    /// The window every block reads (`_since`, `_until`); no patients.
    pub(crate) window: ScanFilter,
    /// Group members who joined after `_since` (D7): their blocks read their whole
    /// compartment up to `_until`.
    pub(crate) late: HashSet<String>,
    /// The window of the late joiners' blocks.
    pub(crate) late_window: ScanFilter,
}

/// The patients of a part's blocks.
pub(crate) enum BlockPatients {
    /// These ids, in order (group members, or the `patient` parameter).
    Listed(Vec<String>),
    /// The patients with ids in this range that have resources in the window, in the
    /// store's order ([`sluice_store::ExportReads::compartment_patients`]; patient level).
    Range(IdRange),
}

/// What an export reads ([`Engine::filters`]).
struct Filters {
    /// Compartment types at patient and group level; `None` at system level.
    compartment: Option<ScanFilter>,
    /// Every type at system level; types outside the compartment (asked for in `_type`)
    /// at patient and group level.
    plain: ScanFilter,
    /// Group level with `_since` (D7): the compartments of the members who joined after
    /// `_since`, last updated at or before it (the compartment filter reads their changes
    /// after it). `None` when nobody joined.
    late: Option<ScanFilter>,
    /// The deletions to list for compartment types (`deleted` set): those of the
    /// compartment filter's patients, without the late joiners (D7). `None` at system level.
    deletions: Option<ScanFilter>,
}

impl Filters {
    /// The filters of an export of the compartments of `patients`, without late joiners.
    fn of(plain: ScanFilter, patients: Patients) -> Filters {
        Filters {
            compartment: Some(only(&plain, patients.clone(), false)),
            deletions: Some(only(&plain, patients, true)),
            late: None,
            plain,
        }
    }

    /// The filter type `t` is read through (before [`narrow`]ing).
    fn for_type(&self, t: &str) -> ScanFilter {
        pick(t, self.compartment.as_ref(), &self.plain)
    }
}

/// `plain` restricted to the compartments of `patients` (their deletions when `deleted`).
fn only(plain: &ScanFilter, patients: Patients, deleted: bool) -> ScanFilter {
    ScanFilter { patients: Some(patients), deleted, ..plain.clone() }
}

/// The filter type `t` is read through: `compartment`, when there is one and `t` is a
/// compartment type, else `plain`.
fn pick(t: &str, compartment: Option<&ScanFilter>, plain: &ScanFilter) -> ScanFilter {
    match compartment {
        Some(cf) if is_patient_compartment_type(t) => cf.clone(),
        _ => plain.clone(),
    }
}

/// What a run reads and how much of it ([`Engine::count_reads`]).
struct Reads {
    /// The filters.
    filters: Filters,
    /// Resources to export per type, the late joiners' included.
    counts: BTreeMap<String, u64>,
    /// The late joiners' resources from before `_since` per compartment type (D7; empty
    /// without late joiners).
    late: BTreeMap<String, u64>,
    /// The deletions filter of the types outside the compartment (D12).
    deleted_plain: ScanFilter,
    /// Deletions to list per type (D12; empty without `_since`).
    deleted: BTreeMap<String, u64>,
}

impl Engine {
    /// Plans the parts of a run on `snapshot`, largest first, and sets the job's progress
    /// entries (with their totals) to what they will read.
    pub(crate) async fn plan_parts(
        &self,
        job: &mut JobRecord,
        snapshot: &Snapshot,
    ) -> Result<Vec<PlannedPart>, RunError> {
        let phase = std::time::Instant::now();
        let reads = self.count_reads(job, snapshot).await?;
        tracing::debug!(export_id = %job.id, ms = phase.elapsed().as_millis() as u64, "filters and counts");
        let types = job.plan.resolve_types(reads.counts.keys().map(String::as_str));
        // One part per type, or one per id range of a large type (every source of the type
        // restricted to the range); the deletions of every type go into one `Bundle` part.
        let total: u64 = types.iter().map(|t| reads.counts[t]).sum();
        let mut parts: Vec<PlannedPart> = Vec::new();
        job.progress.clear();
        for t in &types {
            job.progress.insert(t.clone(), TypeProgress { done: 0, total: reads.counts[t] });
        }
        if job.plan.organize_by_patient {
            let (compartment, late) = (reads.filters.compartment.as_ref(), reads.filters.late.as_ref());
            parts.extend(self.block_parts(&types, snapshot, compartment, late).await?);
        }
        for t in types.iter().filter(|_| !job.plan.organize_by_patient) {
            parts.extend(self.type_parts(job, snapshot, &reads, t, total).await?);
        }
        parts.extend(Self::deletions_part(job, &reads));
        // Largest parts first, so the big ones run alongside the many small ones instead of
        // alone at the end.
        parts.sort_by_key(|p| std::cmp::Reverse(p.size));
        Ok(parts)
    }

    /// The filters of the export and the per-type counts of what they read.
    async fn count_reads(&self, job: &JobRecord, snapshot: &Snapshot) -> Result<Reads, RunError> {
        let filters = self.filters(job, snapshot).await?;
        let mut counts = self.counts(job, snapshot, filters.compartment.as_ref(), &filters.plain).await?;
        self.recount_narrowed(&job.plan, snapshot, &mut counts, |t| filters.for_type(t)).await?;
        // Group members who joined after `_since` (D7): their resources from before it too.
        // Disjoint from what the compartment filter reads (last updated at or before
        // `_since`, against after it), so the counts add up and nothing is read twice.
        let late = match &filters.late {
            Some(lf) => {
                let mut c = self.store.count(snapshot, lf).await?;
                c.retain(|t, _| is_patient_compartment_type(t));
                self.recount_narrowed(&job.plan, snapshot, &mut c, |_| lf.clone()).await?;
                c
            }
            None => BTreeMap::new(),
        };
        for (t, n) in &late {
            *counts.entry(t.clone()).or_default() += n;
        }
        // With `_since`, the resources deleted since are listed too (D12).
        let deleted_plain = ScanFilter { deleted: true, ..filters.plain.clone() };
        let deleted = match job.plan.since {
            Some(_) => self.counts(job, snapshot, filters.deletions.as_ref(), &deleted_plain).await?,
            None => BTreeMap::new(),
        };
        Ok(Reads { filters, counts, late, deleted_plain, deleted })
    }

    /// The parts reading type `t` (not organized by patient): one, or one per id range when
    /// the type is large ([`range_parts`]), each reading every source of the type within
    /// its range. `total` is the size of the whole export.
    async fn type_parts(
        &self,
        job: &JobRecord,
        snapshot: &Snapshot,
        reads: &Reads,
        t: &str,
        total: u64,
    ) -> Result<Vec<PlannedPart>, RunError> {
        let count = reads.counts[t];
        let mut sources = Vec::with_capacity(2);
        if let Some(lf) = reads.filters.late.as_ref().filter(|_| reads.late.contains_key(t)) {
            sources.push((t.to_string(), narrow(&job.plan, t, lf)));
        }
        sources.push((t.to_string(), narrow(&job.plan, t, &reads.filters.for_type(t))));
        let ranges = match range_parts(&self.config, count, total) {
            1 => Vec::new(),
            n => IdRange::between(&self.store.split_points(snapshot, t, n).await?),
        };
        if ranges.len() < 2 {
            return Ok(vec![PlannedPart {
                resource_type: t.to_string(),
                sources,
                blocks: None,
                deleted: false,
                size: count,
            }]);
        }
        tracing::debug!(export_id = %job.id, resource_type = %t, ranges = ranges.len(), "reading a type in id ranges");
        let size = count / ranges.len() as u64;
        Ok(ranges
            .into_iter()
            .map(|range| {
                let sources = sources
                    .iter()
                    .map(|(rt, f)| (rt.clone(), ScanFilter { id_range: Some(range.clone()), ..f.clone() }))
                    .collect();
                PlannedPart { resource_type: t.to_string(), sources, blocks: None, deleted: false, size }
            })
            .collect())
    }

    /// The part listing the deletions (`_since` exports, D12): every type's, in one
    /// `Bundle` part with its own progress entry ([`DELETED`]). `None` when no type has any.
    fn deletions_part(job: &mut JobRecord, reads: &Reads) -> Option<PlannedPart> {
        let types = job.plan.resolve_types(reads.deleted.keys().map(String::as_str));
        if types.is_empty() {
            return None;
        }
        let total = types.iter().map(|t| reads.deleted[t]).sum();
        job.progress.insert(DELETED.to_string(), TypeProgress { done: 0, total });
        let compartment = reads.filters.deletions.as_ref();
        let sources = types.iter().map(|t| (t.clone(), pick(t, compartment, &reads.deleted_plain))).collect();
        Some(PlannedPart { resource_type: "Bundle".into(), sources, blocks: None, deleted: true, size: total })
    }

    /// The parts of an export organized by patient: the patients split into about
    /// [`EngineConfig::parallelism`] parts ([`Engine::patient_groups`]).
    async fn block_parts(
        &self,
        types: &[String],
        snapshot: &Snapshot,
        compartment: Option<&ScanFilter>,
        late: Option<&ScanFilter>,
    ) -> Result<Vec<PlannedPart>, RunError> {
        let mut block_types: Vec<String> = types.iter().filter(|t| is_patient_compartment_type(t)).cloned().collect();
        block_types.sort_by_key(|t| (t != "Patient", t.clone()));
        let Some(cf) = compartment else {
            return Err(RunError::Failed(Issue::fatal(
                IssueCode::Exception,
                "organizeOutputBy=Patient needs a patient or group export",
            )));
        };
        let window = ScanFilter { patients: None, ..cf.clone() };
        let (late_set, late_window) = match late {
            Some(ScanFilter { patients: Some(Patients::Only(ids)), .. }) => {
                (ids.iter().cloned().collect(), ScanFilter { since: None, ..window.clone() })
            }
            _ => (HashSet::new(), window.clone()),
        };
        let groups = self.patient_groups(snapshot, cf).await?;
        Ok(groups
            .into_iter()
            .map(|patients| {
                let size = match &patients {
                    BlockPatients::Listed(ids) => ids.len() as u64,
                    BlockPatients::Range(_) => 0,
                };
                let blocks = Blocks {
                    patients,
                    types: block_types.clone(),
                    window: window.clone(),
                    late: late_set.clone(),
                    late_window: late_window.clone(),
                };
                PlannedPart {
                    resource_type: BLOCK_FILES.into(),
                    sources: Vec::new(),
                    blocks: Some(Arc::new(blocks)),
                    deleted: false,
                    size,
                }
            })
            .collect())
    }

    /// The patients of the compartment filter `cf` in about [`EngineConfig::parallelism`]
    /// groups: listed patients in contiguous chunks; at patient level, id ranges of the
    /// `Patient` resources.
    async fn patient_groups(&self, snapshot: &Snapshot, cf: &ScanFilter) -> Result<Vec<BlockPatients>, RunError> {
        let p = self.config.parallelism.max(1);
        Ok(match &cf.patients {
            Some(Patients::Only(ids)) => {
                ids.chunks(ids.len().div_ceil(p).max(1)).map(|c| BlockPatients::Listed(c.to_vec())).collect()
            }
            _ => IdRange::between(&self.store.split_points(snapshot, "Patient", p).await?)
                .into_iter()
                .map(BlockPatients::Range)
                .collect(),
        })
    }

    /// Recounts the types in `counts` whose `_typeFilter` bounds `_lastUpdated` or `_id`
    /// ([`narrow`]): they read, so they count, only that. `filter_of` gives a type's filter
    /// before narrowing.
    async fn recount_narrowed(
        &self,
        plan: &ExportPlan,
        snapshot: &Snapshot,
        counts: &mut BTreeMap<String, u64>,
        filter_of: impl Fn(&str) -> ScanFilter,
    ) -> Result<(), RunError> {
        for t in plan.type_filters.keys() {
            let Some(n) = counts.get_mut(t) else { continue };
            let wide = filter_of(t);
            let filter = narrow(plan, t, &wide);
            if filter != wide {
                *n = self.store.count(snapshot, &filter).await?.get(t).copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Per-type counts of what the export reads: compartment types through the compartment
    /// filter at patient and group level, other types whole and only when asked for (D8).
    async fn counts(
        &self,
        job: &JobRecord,
        snapshot: &Snapshot,
        compartment_filter: Option<&ScanFilter>,
        plain_filter: &ScanFilter,
    ) -> Result<BTreeMap<String, u64>, RunError> {
        let in_compartment = is_patient_compartment_type;
        let Some(cf) = compartment_filter else { return Ok(self.store.count(snapshot, plain_filter).await?) };
        let mut counts = self.store.count(snapshot, cf).await?;
        counts.retain(|t, _| in_compartment(t));
        let asked_outside =
            matches!(&job.plan.types, TypeSelection::Only(list) if list.iter().any(|t| !in_compartment(t)));
        if asked_outside {
            let all = self.store.count(snapshot, plain_filter).await?;
            counts.extend(all.into_iter().filter(|(t, _)| !in_compartment(t)));
        }
        Ok(counts)
    }

    /// What the export reads: the compartment filter (for compartment types at patient and
    /// group level), the filter for everything else, and at group level with `_since` the
    /// late joiners' filter (D7).
    async fn filters(&self, job: &JobRecord, snapshot: &Snapshot) -> Result<Filters, RunError> {
        let plan = &job.plan;
        let plain = ScanFilter { since: plan.since, until: plan.until, ..Default::default() };
        match &plan.level {
            Level::System => Ok(Filters { compartment: None, deletions: None, late: None, plain }),
            Level::Patient => Ok(Filters::of(
                plain,
                match &plan.patients {
                    Some(ids) => Patients::Only(ids.clone()),
                    None => Patients::Any,
                },
            )),
            Level::Group(id) => self.group_filters(plan, snapshot, id, plain).await,
        }
    }

    /// The filters of a group export: the members of Group `id` at the snapshot's time (D6),
    /// and with `_since` those who joined after it (D7).
    async fn group_filters(
        &self,
        plan: &ExportPlan,
        snapshot: &Snapshot,
        id: &str,
        plain: ScanFilter,
    ) -> Result<Filters, RunError> {
        let json = self.store.read_at(snapshot, "Group", id).await?.ok_or_else(|| {
            RunError::Failed(Issue::error(
                IssueCode::NotFound,
                format!("Group/{id} does not exist at the export's transaction time"),
            ))
        })?;
        let mut members = group_members(&parse_group(id, &json)?, snapshot.time);
        if let Some(only) = &plan.patients {
            members.retain(|m| only.contains(m));
        }
        // D7: members are compared with the Group version current at `_since`. A `_since`
        // at or after the snapshot's time has no late joiners: the Group then is the Group
        // now, and nothing written after the snapshot is exported.
        let since = match plan.since {
            Some(since) if since < snapshot.time && !members.is_empty() => since,
            _ => return Ok(Filters::of(plain, Patients::Only(members))),
        };
        let then = match self.store.read_as_of(snapshot, "Group", id, since).await? {
            Some(json) => Some(parse_group(id, &json)?),
            None => None,
        };
        let late = late_joiners(&members, then.as_ref(), since);
        if late.is_empty() {
            return Ok(Filters::of(plain, Patients::Only(members)));
        }
        let joined: HashSet<&String> = late.iter().collect();
        let earlier: Vec<String> = members.iter().filter(|m| !joined.contains(m)).cloned().collect();
        // The compartment filter reads every member's changes since `_since`; the late
        // filter reads the late joiners' resources last updated at or before it (and, like
        // everything, at or before `_until`). The two windows do not overlap, so a resource
        // in the compartments of both a late joiner and an earlier member is read once, by
        // the filter its `lastUpdated` falls in: no exclusion in the store, no set of ids
        // in the engine, no JSON parsed, and the counts simply add up.
        let until = Some(plan.until.map_or(since, |u| u.min(since)));
        let late = ScanFilter { until, patients: Some(Patients::Only(late)), ..Default::default() };
        Ok(Filters {
            compartment: Some(only(&plain, Patients::Only(members), false)),
            // Deletions (D12) only of the members the client already had data for: a late
            // joiner's resources deleted since `_since` were never sent for this group, so
            // there is nothing to take back. A deleted resource that was also in an earlier
            // member's compartment is still listed, through that member.
            deletions: Some(only(&plain, Patients::Only(earlier), true)),
            late: Some(late),
            plain,
        })
    }
}

/// A Group resource's JSON, parsed for the membership rules ([`sluice_fhir::group`]).
fn parse_group(id: &str, json: &str) -> Result<serde_json::Value, RunError> {
    serde_json::from_str(json).map_err(|e| {
        RunError::Failed(Issue::fatal(IssueCode::Exception, format!("Group/{id} is not readable JSON: {e}")))
    })
}

/// `filter` for reading `resource_type`, narrowed to the `_lastUpdated` window and `_id`
/// list its `_typeFilter` queries bound (a superset of what they match: the queries are
/// still evaluated on every resource read). Not for deletions.
pub(crate) fn narrow(plan: &ExportPlan, resource_type: &str, filter: &ScanFilter) -> ScanFilter {
    match plan.type_filter(resource_type).map(sluice_search::store_bounds) {
        Some(b) if !b.is_unbounded() => filter.narrowed(b.after, b.until, b.ids.map(|ids| ids.into_iter().collect())),
        _ => filter.clone(),
    }
}

/// How many id ranges to read a type of `count` resources (of `total` in the export) in:
/// 1 (not split) unless the type has at least [`EngineConfig::range_split_min`] resources;
/// then enough ranges that each is at most half a fair share (`total / parallelism / 2`),
/// at most `parallelism`.
fn range_parts(config: &EngineConfig, count: u64, total: u64) -> usize {
    let p = config.parallelism.max(1) as u64;
    let min = config.range_split_min;
    if p < 2 || min == 0 || count < min {
        return 1;
    }
    count.saturating_mul(2 * p).div_ceil(total.max(1)).clamp(1, p) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_types_are_split_into_ranges_of_at_most_half_a_fair_share() {
        let cfg = |parallelism, range_split_min| EngineConfig { parallelism, range_split_min, ..Default::default() };
        let two = cfg(2, 50_000);
        // Observation as 42% of 1M resources on 2 cores: two ranges of 21%.
        assert_eq!(range_parts(&two, 420_000, 1_000_000), 2);
        // At most half a fair share (25% on 2 cores) is left whole, like anything small.
        assert_eq!(range_parts(&two, 250_000, 1_000_000), 1);
        assert_eq!(range_parts(&two, 250_001, 1_000_000), 2);
        assert_eq!(range_parts(&two, 49_999, 50_000), 1, "below range_split_min");
        assert_eq!(range_parts(&two, 1_000_000, 1_000_000), 2, "never more than parallelism");
        let eight = cfg(8, 50_000);
        assert_eq!(range_parts(&eight, 420_000, 1_000_000), 7);
        assert_eq!(range_parts(&eight, 100_000, 1_000_000), 2);
        assert_eq!(range_parts(&eight, 600_000, 1_000_000), 8);
        assert_eq!(range_parts(&cfg(1, 50_000), 1_000_000, 1_000_000), 1, "one core: nothing to share");
        assert_eq!(range_parts(&cfg(2, 0), 1_000_000, 1_000_000), 1, "0 turns splitting off");
    }
}
